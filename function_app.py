"""The Function App: assembles the Blueprints and nothing else."""

import azure.functions as func

from triggers import http_intake, ops, queue_intake

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(http_intake.bp)
app.register_functions(queue_intake.bp)
app.register_functions(ops.bp)
