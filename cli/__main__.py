from nmt_cli.main import app

app()
