"""blurctl: LLM unlearning with BLUR, the bi-level unlearning method."""

__version__ = "0.1.0"
