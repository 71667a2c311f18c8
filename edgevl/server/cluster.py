"""The same FastAPI app and engine as a Ray Serve deployment: replicas, routing, back-pressure.

Each replica builds the app itself (the builder below runs in the replica process), so the model
is loaded and warmed once per replica by the app's own lifespan. A replica routes at most
`max_batch + queue_size + 1` requests to itself, one more than its own queue holds, so
overflow meets the app's 429 JSON error, exactly as on a single box; beyond that Ray holds
`ray_max_queued_requests` and then refuses with 503.
"""

from __future__ import annotations

import os
import signal
import threading

from edgevl.server.settings import Settings


def build_deployment(settings: Settings):
    from ray import serve

    def app_builder():
        from edgevl.server.app import create_app

        ctx = serve.get_replica_context()
        os.environ["EDGEVL_REPLICA_NAME"] = str(getattr(ctx, "replica_tag", None) or ctx.replica_id.unique_id)
        return create_app(settings)

    options: dict = {
        "name": "edgevl",
        "ray_actor_options": {"num_cpus": settings.ray_num_cpus},
        "max_ongoing_requests": settings.max_batch + settings.queue_size + 1,
        "max_queued_requests": settings.ray_max_queued_requests,
        "health_check_period_s": 10,
    }
    if settings.ray_max_replicas:
        options["autoscaling_config"] = {"min_replicas": settings.ray_min_replicas,
                                         "max_replicas": settings.ray_max_replicas,
                                         "target_ongoing_requests": settings.max_batch}
    else:
        options["num_replicas"] = settings.ray_replicas

    @serve.deployment(**options)
    @serve.ingress(app_builder)
    class EdgeVL:
        pass

    return EdgeVL.bind()


def run_cluster(settings: Settings) -> int:
    """Start (or join) Ray, deploy, serve until SIGTERM/SIGINT, then shut Serve and Ray down."""
    import ray
    from ray import serve

    if settings.model is None:  # each replica would build the demo model; build it once, here
        from edgevl.demo import demo_model_dir

        settings = settings.model_copy(update={"model": str(demo_model_dir())})
    ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_deployment(settings), name="edgevl", route_prefix="/")
    print(f"edgevl on Ray Serve: {settings.ray_replicas} replica(s) at http://{settings.host}:{settings.port}",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
