"""Private federated LoRA on Flower (``pip install flwr``): a ``ClientApp``, a ``Strategy``, a ``ServerApp``,
and :func:`run_flower`, which runs them on this machine with Flower's Deployment Runtime.

Why the Deployment Runtime: Flower's Simulation Runtime needs Ray (``flwr[simulation]``, a large extra
dependency); the Deployment Runtime is part of ``flwr`` itself. :func:`run_flower` starts one SuperLink and one
SuperNode per client as local processes on 127.0.0.1 (insecure HTTP, loopback only), submits the app with
``flwr run``, and stops them afterwards. A real deployment runs the same apps with a SuperNode at every site.

Where things live:
- run config (public, from the app's pyproject.toml): the :class:`FedConfig` fields, the base model and LoRA
  settings, the demo data settings, ``output_dir`` (where the ServerApp writes the result);
- node config (each SuperNode's own): ``partition-id`` (the client id), ``num-partitions``, optionally
  ``data-path`` (the site's own records: JSONL with "text", or one record per line) and, in tests only,
  ``insecure-seed`` (fixes that client's noise and batches: NOT private);
- the client's ledger and round count live in the ClientApp's ``context.state`` on its SuperNode.
The server receives only the clients' noised factors and public counts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from dptrain.federated.algorithm import FedConfig, FederatedResult, aggregate, server_update, svd_due
from dptrain.federated.app import AppSettings
from dptrain.federated.lora import get_factors

logger = logging.getLogger(__name__)

__all__ = ["client_app", "server_app", "FedSVDStrategy", "run_flower"]

# ---------------------------------------------------------------------------------------------- ClientApp
client_app = ClientApp()


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    """One round of one client: DP-SGD on its own records, on the factors the server sent."""
    settings = AppSettings(context.run_config)
    model, tokenizer = settings.load_model()
    client = settings.make_client(context.node_config, tokenizer)
    if "dptrain" in context.state:
        client.load_state_dict(json.loads(context.state["dptrain"]["state"]))
    factors = msg.content["arrays"].to_torch_state_dict()
    update = client.train_round(model, factors, int(msg.content["config"]["server-round"]))
    context.state["dptrain"] = ConfigRecord({"state": json.dumps(client.state_dict())})
    metrics = MetricRecord({  # public: the record count and functions of public settings
        "num-examples": update.num_examples, "client_id": client.client_id, "epsilon": update.epsilon,
        "delta": client.delta, "noise_multiplier": client.noise_multiplier, "sample_rate": client.sample_rate,
    })
    return Message(RecordDict({"arrays": ArrayRecord(update.factors), "metrics": metrics}), reply_to=msg)


# ---------------------------------------------------------------------------------------------- Strategy
class FedSVDStrategy(FedAvg):
    """FedAvg of the clients' trained factors (weighted by their public record counts), then FedSVD's
    re-factorisation when due (``FedConfig.method`` picks FedSVD, FFA-LoRA or DP-LoRA). Every client trains in
    every round; a failed client stops the run."""

    def __init__(self, config: FedConfig, num_clients: int):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_clients,
                         min_available_nodes=num_clients)
        self.config, self.num_clients = config, num_clients
        self.history: List[dict] = []
        self.clients: Dict[int, dict] = {}  # client id -> its last public metrics
        self.global_factors: Dict[str, torch.Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.global_factors = arrays.to_torch_state_dict()  # what this round's clients start from
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        valid, failed = self._check_and_log_replies(replies, is_train=True)
        if failed or len(valid) != self.num_clients:
            reasons = "; ".join(m.error.reason for m in failed) or "missing replies"
            raise RuntimeError(f"round {server_round}: {len(valid)} of {self.num_clients} clients replied ({reasons})")
        return self.aggregate_contents(server_round, [m.content for m in valid])

    def aggregate_contents(self, server_round: int, contents: Sequence[RecordDict]):
        """``(new global ArrayRecord, MetricRecord)`` from the clients' replies (``arrays`` and ``metrics``)."""
        contents = sorted(contents, key=lambda c: int(c["metrics"]["client_id"]))  # fixed order: reproducible sums
        updates = [c["arrays"].to_torch_state_dict() for c in contents]
        weights = [int(c["metrics"]["num-examples"]) for c in contents]
        new = server_update(self.global_factors, aggregate(updates, weights), server_round, self.config)
        for c in contents:
            self.clients[int(c["metrics"]["client_id"])] = dict(c["metrics"])
        record = {"round": server_round, "svd": svd_due(server_round, self.config),
                  "max_epsilon": max(float(c["epsilon"]) for c in self.clients.values())}
        self.history.append(record)
        return ArrayRecord(new), MetricRecord({"max_epsilon": record["max_epsilon"], "svd": int(record["svd"])})


# ---------------------------------------------------------------------------------------------- ServerApp
server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """All rounds; writes ``factors.pt`` and ``result.json`` to the run config's ``output_dir``."""
    settings = AppSettings(context.run_config)
    model, _ = settings.load_model()
    strategy = FedSVDStrategy(settings.fed, int(settings.app["num_clients"]))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(get_factors(model)), num_rounds=settings.fed.rounds,
                            timeout=float(settings.app["round_timeout"]))
    out = Path(str(settings.app["output_dir"]) or ".")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(dict(result.arrays.to_torch_state_dict()), out / "factors.pt")
    clients = [strategy.clients[k] for k in sorted(strategy.clients)]
    summary = {"history": strategy.history, "epsilons": [c["epsilon"] for c in clients],
               "deltas": [c["delta"] for c in clients], "clients": clients}
    (out / "result.json.tmp").write_text(json.dumps(summary, indent=1))
    os.replace(out / "result.json.tmp", out / "result.json")  # whole file or none: the launcher polls for it


# ---------------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(values: Mapping) -> str:
    import tomli_w

    return tomli_w.dumps(dict(values))


def _app_pyproject(run_config: Mapping) -> str:
    return _toml({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "dptrain-federated", "version": "1.0.0", "description": "dptrain private federated LoRA",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "dptrain",
            "components": {"serverapp": "dptrain.federated.flower:server_app",
                           "clientapp": "dptrain.federated.flower:client_app"},
            "config": dict(run_config),
        }}},
    })


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group this launcher created for it (start_new_session)
    except ProcessLookupError:
        pass


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM the process groups this launcher started (Flower's helpers included), then SIGKILL what is left."""
    for p in procs:
        _signal_group(p, signal.SIGTERM)
    deadline = time.time() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        _signal_group(p, signal.SIGKILL)
        p.wait()


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def run_flower(run_config: Mapping, *, node_configs: Optional[Sequence[Mapping]] = None, workdir=None,
               timeout: float = 3600.0) -> FederatedResult:
    """Run the apps on a local Flower deployment (1 SuperLink + one SuperNode per client on 127.0.0.1).

    ``run_config``: FedConfig fields and :data:`APP_DEFAULTS` keys (``num_clients`` SuperNodes are started).
    ``node_configs``: extra node config per client (e.g. ``{"data-path": ...}``). Logs go to ``workdir/logs``
    (default ``workdir``: a new temporary folder, kept). Raises ``RuntimeError``/``TimeoutError`` whose first line
    says what failed and where the logs are.
    """
    if shutil.which("flower-superlink", path=_path()) is None:
        raise ValueError("Flower's command-line tools are not installed: pip install flwr")
    settings = AppSettings(run_config)  # validates before anything starts
    num_clients = int(settings.app["num_clients"])
    if node_configs is not None and len(node_configs) != num_clients:
        raise ValueError(f"need one node config per client ({num_clients}), found {len(node_configs)}")
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="dptrain-flower-"))
    app, home, logs, out = work / "app", work / "flwr-home", work / "logs", work / "output"
    for d in (app, home, logs, out):
        d.mkdir(parents=True, exist_ok=True)
    for stale in ("factors.pt", "result.json"):
        (out / stale).unlink(missing_ok=True)
    port = _free_port()
    (app / "pyproject.toml").write_text(_app_pyproject({**dict(run_config), "output_dir": str(out.resolve())}))
    (home / "config.toml").write_text(_toml({"superlink": {
        "default": "dptrain-local", "dptrain-local": {"address": f"127.0.0.1:{port}", "insecure": True}}}))
    env = {**os.environ, "FLWR_HOME": str(home.resolve()), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": _path()}
    procs: List[subprocess.Popen] = []

    def start(name: str, argv: List[str]) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
        log.close()
        procs.append(proc)
        return proc

    try:
        start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(port)])
        for k in range(num_clients):
            node = {"partition-id": k, "num-partitions": num_clients, **dict((node_configs or [{}] * num_clients)[k])}
            node_file = work / f"node{k}.toml"
            node_file.write_text(_toml(node))
            start(f"supernode{k}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                                    "--port", str(_free_port()), "--node-config", str(node_file.resolve())])
        runner = start("flwr-run", ["flwr", "run", str(app.resolve()), "dptrain-local", "--stream"])
        servers = dict(zip(["superlink"] + [f"supernode{k}" for k in range(num_clients)], procs))
        _wait_for_result(runner, servers, out / "result.json", logs, timeout)
    finally:
        _stop(procs)
    summary = json.loads((out / "result.json").read_text())
    factors = torch.load(out / "factors.pt", map_location="cpu", weights_only=True)
    return FederatedResult(factors, summary["history"], summary["epsilons"], summary["deltas"])


def _wait_for_result(runner: subprocess.Popen, servers: Mapping[str, subprocess.Popen], result: Path, logs: Path,
                     timeout: float) -> None:
    """Until ``flwr run`` writes ``result``; raises, naming the process and its log, if a server exits early, the
    run ends without a result, or ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while runner.poll() is None and not result.exists():
        if time.time() > deadline:
            raise TimeoutError(f"the Flower run did not finish in {timeout:.0f} s; logs in {logs}")
        for name, p in servers.items():
            if p.poll() is not None:
                raise RuntimeError(f"Flower's {name} exited early (status {p.returncode}); logs in {logs}\n"
                                   f"{_tail(logs / f'{name}.log')}")
        time.sleep(1)
    if not result.exists():
        raise RuntimeError(f"the Flower run ended without a result; logs in {logs}\n{_tail(logs / 'flwr-run.log')}")


def _path() -> str:
    """PATH with this interpreter's scripts folder first (Flower starts its helpers by name)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
