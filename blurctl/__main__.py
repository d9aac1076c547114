from blurctl.cli import main

main()
