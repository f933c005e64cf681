"""The Function App: assembles the Blueprints (and telemetry, where it is asked for) and nothing else."""

import azure.functions as func

from shared import telemetry
from triggers.alerts_http import alerts_bp
from triggers.followups_http import followups_http_bp
from triggers.followups_queue import followups_queue_bp
from triggers.http_intake import http_bp
from triggers.ops import ops_bp
from triggers.queue_intake import queue_bp

telemetry.configure()  # a no-op, importing nothing, unless a telemetry target is set
app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(http_bp)
app.register_functions(queue_bp)
app.register_functions(ops_bp)
app.register_functions(followups_http_bp)
app.register_functions(followups_queue_bp)
app.register_functions(alerts_bp)
