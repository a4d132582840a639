"""`genadapter serve`: an OpenAI-compatible service with one generated adapter per API key.

    genadapter keys add alice --keys-file keys.json      # prints alice's key, stores its hash
    genadapter serve --generator DIR --state-dir states --keys-file keys.json

Routes (all but /health need `Authorization: Bearer KEY`; the key selects the tenant):
    GET  /v1/models, POST /v1/chat/completions, POST /v1/completions   (OpenAI, streaming too)
    POST /v1/read {"text": ...} | {"texts": [...]}, GET|DELETE /v1/state, GET /v1/state/export

Layout: keys.py (key file), store.py (tenant states on disk), scheduler.py (the model thread
that batches every tenant's requests), schemas.py + app.py (FastAPI routes), transport.py
(uvicorn with timeouts). See docs/serving.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .app import BODY_TIMEOUT, MAX_BODY

PORT = 8080
SESSION = """\
a session (copy-paste; DIR is a saved generator, e.g. experiments/finetune/smollm2-instruct-generator):
  export KEY=$(genadapter keys add alice --keys-file keys.json)
  genadapter serve --generator DIR --state-dir states --keys-file keys.json &
  until curl -sf http://127.0.0.1:8080/health > /dev/null; do sleep 1; done   # loading the model
  curl -s http://127.0.0.1:8080/v1/read -H "Authorization: Bearer $KEY" \\
       -H "Content-Type: application/json" -d '{"text": "Ada Lovelace wrote the first program."}'
  python -c "from openai import OpenAI; import os
  c = OpenAI(base_url='http://127.0.0.1:8080/v1', api_key=os.environ['KEY'])
  r = c.chat.completions.create(model='genadapter', messages=[{'role': 'user', 'content': 'Who wrote the first program?'}])
  print(r.choices[0].message.content)"
  genadapter keys revoke alice --keys-file keys.json   # alice's key stops working at once
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..stream.common import add_generator_arguments

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = SESSION
    add_generator_arguments(parser)
    parser.add_argument("--state-dir", default="states", help="one <tenant>.safetensors per tenant")
    parser.add_argument(
        "--keys-file", required=True, metavar="PATH", help="from `genadapter keys add`"
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=PORT, help="0: any free port")
    parser.add_argument(
        "--max-batch", type=int, default=16, help="rows decoded together (1: one at a time)"
    )
    parser.add_argument("--gather-ms", type=float, default=5.0, help="wait for company when idle")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY)
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT, help="seconds")
    parser.add_argument("--head-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument("--log", action="store_true", help="log every request")


def build(ga, args: argparse.Namespace):
    """The service and its FastAPI app for these arguments."""
    from .app import Service, create_app
    from .keys import KeyStore
    from .scheduler import Scheduler
    from .store import FairLock, TenantStore

    lock = FairLock()
    service = Service(
        ga,
        KeyStore(args.keys_file),
        TenantStore(ga, args.state_dir, lock),
        Scheduler(ga, lock, max_batch=args.max_batch, gather_ms=args.gather_ms),
        max_body=args.max_body_bytes,
        body_timeout=args.body_timeout,
    )
    return service, create_app(service)


def run(args: argparse.Namespace) -> int:
    from ..stream.common import CLIError, load_adapter
    from .transport import make_server

    if args.max_batch < 1:
        print("error: --max-batch must be >= 1", file=sys.stderr)
        return 2
    if not Path(args.keys_file).exists():
        print(f"note: no keys in {args.keys_file} yet: `genadapter keys add`", file=sys.stderr)
    try:
        ga = load_adapter(args)
        service, app = build(ga, args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except (ValueError, OSError) as e:  # a broken keys file, an unwritable state dir
        print(f"error: {e}", file=sys.stderr)
        return 2
    server, sock = make_server(app, args.host, args.port, args.head_timeout, log=args.log)
    host, port = sock.getsockname()[:2]
    server.banner = f"serving generator {ga.generator.fingerprint()} on http://{host}:{port}"
    try:
        server.run(sockets=[sock])  # SIGINT/SIGTERM: finish what is in flight, then stop
    finally:
        service.scheduler.close()  # every acknowledged read is already on disk
    return 0
