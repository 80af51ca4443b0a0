from nmt_cli.main import main

main()
