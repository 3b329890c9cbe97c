"""A Trio HTTP service that embeds a worker in its own nursery tree.

    python examples/trio_service.py [--port 8080] [--state-dir DIR]

The service and the worker are two children of one ``Supervisor``: the HTTP
front end (Starlette on Hypercorn's Trio worker) accepts jobs and the worker
runs them. ``POST /jobs`` with ``{"prompt": "..."}`` returns the item id,
``GET /jobs/{id}`` waits for and returns the outcome. Ctrl-C drains the worker
and stops the server. The bound URL is printed on stdout.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from functools import partial

import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from supervisor import ChildSpec, Restart, SupervisorSpec, Worker, WorkerConfig, open_supervisor


def make_app(worker: Worker) -> Starlette:
    async def create(request: Request) -> JSONResponse:
        body = await request.json()
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            return JSONResponse({"error": 'send {"prompt": "..."}'}, status_code=400)
        return JSONResponse({"id": await worker.submit(prompt)}, status_code=201)

    async def result(request: Request) -> JSONResponse:
        outcome = await worker.wait(request.path_params["item_id"])
        return JSONResponse(
            {
                "status": outcome.status.value,
                "result": outcome.result,
                "exit_code": outcome.exit_code,
            }
        )

    return Starlette(
        routes=[
            Route("/jobs", create, methods=["POST"]),
            Route("/jobs/{item_id}", result, methods=["GET"]),
        ]
    )


async def http_front(
    worker: Worker, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, make_app(worker), config))  # type: ignore[arg-type]
        print(f"listening on {binds[0]}", flush=True)
        task_status.started()


async def main(port: int, state_dir: str) -> None:
    worker = Worker(WorkerConfig(state_dir=state_dir, api_enabled=False, drain_timeout=5.0))
    spec = SupervisorSpec(
        [
            # started first (the front needs it); TRANSIENT: once drained it stays stopped
            ChildSpec("worker", worker.run, restart=Restart.TRANSIENT, shutdown=None),
            ChildSpec("http", http_front, args=(worker, port)),
        ],
        name="service",
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_supervisor(spec):
            async for _ in signals:
                print("draining the worker, then stopping", flush=True)
                await worker.drain()
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--state-dir", default=None)
    args = parser.parse_args()
    trio.run(main, args.port, args.state_dir or tempfile.mkdtemp(prefix="trio-service-"))
    sys.exit(0)
