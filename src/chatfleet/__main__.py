from chatfleet.cli import app

app(prog_name="chatfleet")
