"""A practitioner's day, end to end on tiny models: `dsft init` -> `dsft train` -> `dsft chat`
(one answer, and a session in a pseudo-terminal); W&B and MLflow offline in a real run; the LoRA
variants train, resume and export (with a model card), and the export is pushed to a local
stand-in for the Hub API."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml

from ..conftest import ROOT, base_config, cpu_env, run_dsft, train_rows, write_config
from ..unit.test_monitor import read_wandb_run

pytestmark = pytest.mark.slow
DSFT = (
    str(ROOT / ".venv" / "bin" / "dsft") if (ROOT / ".venv" / "bin" / "dsft").exists() else "dsft"
)


def _dsft(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [DSFT, *args], cwd=cwd, env={**cpu_env(2), **env}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    if proc.returncode:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def test_init_train_chat(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    cfg = tmp_path / "config.yaml"
    made = _dsft(
        ["init", str(tiny_model), str(tiny_data), "--method", "full", "-o", str(cfg)], tmp_path
    )
    assert made.returncode == 0
    text = cfg.read_text()
    assert "# memory plan" in text and "* chosen: ZeRO-0" in text
    tree = yaml.safe_load(text)
    assert tree["data"]["format"] == "auto" and "found: instruction 200" in text
    assert tree["train"]["precision"] == "fp32"  # planned for this CPU machine

    trained = _dsft(["train", str(cfg)], tmp_path)  # unchanged
    assert trained.returncode == 0
    run = tmp_path / tree["output_dir"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] > 0
    assert (run / "final" / "README.md").is_file()

    answer = _dsft(
        [
            "chat",
            str(run),
            "--prompt",
            "Reverse\n\nabc",
            "--temperature",
            "1.5",
            "--seed",
            "1",
            "--max-new-tokens",
            "8",
        ],
        tmp_path,
    )
    # a barely trained tiny model ends at once when greedy: sampled (seeded, so deterministic)
    assert answer.returncode == 0 and answer.stdout.strip()

    # a session in a terminal: a question, its streamed answer, then Ctrl-D; again with /exit
    for leave in ("eof", "/exit"):
        child = pexpect.spawn(
            DSFT, ["chat", str(run / "final"), "--temperature", "1.5", "--seed", "1", "--max-new-tokens", "8"],
            cwd=str(tmp_path), env=cpu_env(2), encoding="utf-8", timeout=300,
        )  # fmt: skip
        child.expect("you> ")
        child.sendline("Sort dcba")
        child.expect("assistant> ")
        child.expect("you> ")
        assert child.before.strip()  # the answer, streamed before the next prompt
        if leave == "eof":
            child.sendeof()
        else:
            child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, leave


def test_trackers_in_a_run(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    tree = base_config(
        tiny_model, tiny_data, out,
        train={"max_steps": 4},
        eval={"every": 2, "generate": False, "before_training": False},
        checkpoint={"save_final": False, "export": False},
        logging={"every": 1, "report_to": ["tensorboard", "wandb", "mlflow"], "group": "sw"},
    )  # fmt: skip
    cfg = write_config(tmp_path / "c.yaml", tree)
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "MLFLOW_TRACKING_URI": ""}
    assert run_dsft(["train", str(cfg)], env=env).returncode == 0
    losses = [(r["step"], r["loss"]) for r in train_rows(out)]
    vals = [(r["step"], r["loss"]) for r in train_rows(out, "val")]
    assert len(losses) == 4 and len(vals) == 2

    (wb,) = (out / "wandb").glob("offline-run-*")
    w = read_wandb_run(wb)
    assert [(h["_step"], h["train/loss"]) for h in w["history"] if "train/loss" in h] == losses
    assert [(h["_step"], h["val/loss"]) for h in w["history"] if "val/loss" in h] == vals
    assert w["config"]["train"]["lr"] == tree["train"]["lr"]
    assert w["summary"]["final/val/loss"] == vals[-1][1]
    assert w["run"].run_group == "sw"

    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in, as dsft sets it
    client = MlflowClient((out / "mlruns").as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "sw"]
    (mrun,) = client.search_runs([exp.experiment_id])
    hist = client.get_metric_history(mrun.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == losses
    assert float(mrun.data.params["train.lr"]) == tree["train"]["lr"]
    assert mrun.data.metrics["final/val/loss"] == vals[-1][1]


class _Hub(BaseHTTPRequestHandler):
    """The few Hub API endpoints `HfApi.create_repo` + `upload_folder` use, in memory."""

    repos: ClassVar[dict[str, dict[str, Any]]] = {}
    seen: ClassVar[list[str]] = []

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _reply(self, body: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append(f"POST {self.path}")
        base = f"http://{self.headers['Host']}"
        parts = self.path.split("?")[0].strip("/").split("/")
        if self.path.startswith("/api/repos/create"):
            req = json.loads(body)
            repo = f"{req.get('organization') or 'user'}/{req['name']}"
            private = req.get("private", req.get("visibility") == "private")
            self.repos[repo] = {"private": private, "files": {}}
            return self._reply({"url": f"{base}/{repo}"})
        if self.path.startswith("/api/validate-yaml"):
            return self._reply({})
        if parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            return self._reply({"files": modes})
        if parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo = f"{parts[2]}/{parts[3]}"
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    v = item["value"]
                    self.repos[repo]["files"][v["path"]] = base64.b64decode(v["content"])
            return self._reply(
                {"commitUrl": f"{base}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40}
            )
        self._reply({"error": "not in the stand-in"}, 404)


@pytest.fixture
def hub() -> Any:
    _Hub.repos, _Hub.seen = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Hub
    server.shutdown()


# rsLoRA scaling and PiSSA initialisation are independent settings: one run checks both
@pytest.mark.parametrize("variant", ["dora", "rslora-pissa"])
def test_lora_variant_trains_resumes_exports_and_pushes(
    variant: str, tiny_model: Path, tiny_data: Path, tmp_path: Path, hub: Any
) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = {"enabled": True, "r": 4, "alpha": 8}
    lora.update(
        {"dora": {"use_dora": True}, "rslora-pissa": {"use_rslora": True, "init": "pissa"}}[variant]
    )
    out = tmp_path / "run"
    tree = base_config(
        tiny_model, tiny_data, out,
        model={"lora": lora},
        train={"max_steps": 2},
        eval={"generate": False, "before_training": False},
        checkpoint={"export": False},
        logging={"every": 1},
    )  # fmt: skip
    cfg = write_config(tmp_path / "c.yaml", tree)
    assert run_dsft(["train", str(cfg)]).returncode == 0
    resumed = run_dsft(["train", str(cfg), "train.max_steps=4", "checkpoint.export=true"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4]

    # trainable parameters as peft counts them for the same LoRA
    theirs = {"dora": {"use_dora": True},
              "rslora-pissa": {"use_rslora": True, "init_lora_weights": "pissa"}}[variant]  # fmt: skip
    ref = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        PeftLoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
            **theirs,
        ),
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == sum(
        p.numel() for p in ref.parameters() if p.requires_grad
    )

    # the merged export and the adapter alone on the base on disk are the same model
    final = out / "final"
    ids = torch.arange(1, 17).unsqueeze(0)
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)

    if variant != "dora":  # chat and push once: they do not depend on the variant
        return
    # `dsft chat` on the adapter directory alone (its config names the base)
    said = _dsft(
        ["chat", str(final / "adapter"), "--prompt", "Add 2+3", "--max-new-tokens", "4"], tmp_path
    )
    assert said.returncode == 0

    # `dsft export --push-to-hub`: the checkpoint exported again, with its card, uploaded
    url, server = hub
    pushed = _dsft(
        ["export", str(out), str(tmp_path / "export"), "--push-to-hub", "me/tiny-" + variant, "--private"],
        tmp_path, HF_ENDPOINT=url, HF_TOKEN="hf_test", HF_HUB_OFFLINE="0",
    )  # fmt: skip
    assert pushed.returncode == 0, server.seen
    repo = server.repos["me/tiny-" + variant]
    assert repo["private"] is True
    assert {"config.json", "model.safetensors", "README.md"} <= set(repo["files"])
    card = repo["files"]["README.md"].decode()
    import hashlib

    digest = hashlib.sha256(tiny_data.read_bytes()).hexdigest()
    assert f"`{tiny_data.name}` | `{digest}`" in card
    assert "CPU rank" in card and "optimizer steps: 4" in card and "val/loss" in card
    assert card == (tmp_path / "export" / "README.md").read_text()
