"""``python -m selfadapt_deploy`` = the ``sa-deploy`` command."""

from selfadapt_deploy.cli import app

app(prog_name="sa-deploy")
