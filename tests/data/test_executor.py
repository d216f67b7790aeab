import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.data.executor import LocalExecutor
from lmforge.data.recipe import run_recipe

REPO = Path(__file__).parents[2]  # so worker processes import tests.data.toy_steps

RECIPE = """
inputs:
  - {{paths: ["{raw}/*.jsonl"], source: web}}
steps:
  - {{step: toy_tag, delay_s: {delay}}}
  - {{step: toy_min_words, min_words: 3}}
  - {{step: toy_text_dedup}}
  - {{step: toy_min_words, min_words: 4}}
output: {{path: "{out}", format: jsonl.gz}}
run_dir: "{run}"
workers: {workers}
imports: [tests.data.toy_steps]
"""


def make_inputs(raw: Path, files: int = 12, docs: int = 6) -> None:
    raw.mkdir(parents=True)
    for f in range(files):
        lines = []
        for d in range(docs):
            text = f"document {d} of file {f} with words" if d % 3 else f"shared boilerplate {d}"
            lines.append(json.dumps({"id": f"{f}-{d}", "text": text}))
        lines.append("{not json")
        (raw / f"{f:03d}.jsonl").write_text("\n".join(lines) + "\n")


def write_recipe(tmp_path: Path, name: str, delay: float, workers: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    text = RECIPE.format(raw=tmp_path / "raw", out=tmp_path / name / "out", run=tmp_path / name / "run",
                         delay=delay, workers=workers)  # fmt: skip
    path.write_text(text)
    return path


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def comparable(stats: dict) -> dict:
    steps = [{k: v for k, v in s.items() if k != "seconds"} for s in stats["steps"]]
    return {"totals": stats["totals"], "steps": steps, "reader_rejects": stats["reader_rejects"]}


@pytest.mark.multiprocess
def test_killed_run_resumes_to_the_same_output_redoing_only_unfinished_tasks(tmp_path):
    make_inputs(tmp_path / "raw")
    reference = run_recipe(write_recipe(tmp_path, "reference", 0.0, 1), progress=False)
    assert reference.balanced and reference.removed > 0 and reference.rejected == 12

    recipe = write_recipe(tmp_path, "killed", 0.04, 2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "data", "run", str(recipe), "--quiet"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = tmp_path / "killed" / "run" / "stages" / "0" / "done"
    deadline = time.monotonic() + 60
    while len(list(done.glob("*.json"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, as an OOM killer or a preemption would
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
    assert 3 <= len(before) < 12, "the kill should land mid-run"
    assert not (tmp_path / "killed" / "run" / "stats.json").exists()

    resumed = run_recipe(recipe, progress=False)
    launches = (tmp_path / "killed" / "run" / "launches.jsonl").read_text().splitlines()
    assert [json.loads(line)["workers"] for line in launches] == [2, 2]
    assert "pyarrow" in json.loads(launches[0])["versions"]
    assert {p.name: p.stat().st_mtime_ns for p in done.glob("*.json") if p.name in before} == before
    assert tree(tmp_path / "killed" / "out") == tree(tmp_path / "reference" / "out")
    for sub in ("excluded", "rejects"):
        assert tree(tmp_path / "killed" / "run" / sub) == tree(tmp_path / "reference" / "run" / sub)
    assert comparable(resumed.to_dict()) == comparable(reference.to_dict())


def test_missing_ray_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    make_inputs(tmp_path / "raw", files=1, docs=1)
    with pytest.raises(ImportError, match=r"pip install 'lmforge\[ray\]'"):
        run_recipe(write_recipe(tmp_path, "noray", 0.0, 1), ["executor=ray"], progress=False)


def minhash_pipeline(raw: Path, out: Path):
    from lmforge.data.dedup.minhash import MinHashDedup
    from lmforge.data.io import JsonlReader, Writer
    from lmforge.data.pipeline import Pipeline

    return Pipeline(JsonlReader(f"{raw}/*.jsonl"), [MinHashDedup(threshold=0.7)], Writer(str(out), "jsonl"),
                    keep_intermediate=True)  # fmt: skip


def make_near_duplicates(raw: Path, files: int = 4) -> None:
    raw.mkdir(parents=True)
    words = [f"w{i}" for i in range(4000)]
    for f in range(files):
        lines = []
        for d in range(20):
            base = words[
                (d * 40) % 3000 : (d * 40) % 3000 + 120
            ]  # every document of file f has copies in others
            text = " ".join(base[: 100 + f])
            lines.append(json.dumps({"id": f"{f}-{d}", "text": text}))
        (raw / f"{f:03d}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.multiprocess
def test_minhash_reduce_is_sharded_across_local_workers_with_the_same_result(tmp_path):
    make_near_duplicates(tmp_path / "raw")
    one = LocalExecutor(1).run(
        minhash_pipeline(tmp_path / "raw", tmp_path / "one"), tmp_path / "run1", progress=False
    )
    two = LocalExecutor(2).run(
        minhash_pipeline(tmp_path / "raw", tmp_path / "two"), tmp_path / "run2", progress=False
    )
    assert one.removed == two.removed > 0
    assert tree(tmp_path / "one") == tree(tmp_path / "two")
    for sub in ("excluded", "stages/0/decision"):
        assert tree(tmp_path / "run1" / sub) == tree(tmp_path / "run2" / sub)
    parts = sorted(p.name for p in (tmp_path / "run2" / "stages" / "0" / "reduce-parts").iterdir())
    assert parts == ["000-of-002", "001-of-002"]
    assert not (tmp_path / "run1" / "stages" / "0" / "reduce-parts").exists()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not collected it yet


@pytest.mark.multiprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ray_workers_exit_when_the_driver_is_killed(tmp_path):
    pytest.importorskip("ray")
    make_inputs(tmp_path / "raw")
    pid_log = tmp_path / "worker-pids"
    recipe = write_recipe(tmp_path, "ray", 20.0, 2)  # a task outlasts the test
    text = recipe.read_text().replace("steps:\n", f'steps:\n  - {{step: toy_pid_log, path: "{pid_log}"}}\n')
    recipe.write_text(text + "executor: ray\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "data", "run", str(recipe), "--quiet"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 180  # a local Ray starts slowly on a busy machine
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = {int(p) for p in pid_log.read_text().split()} if pid_log.exists() else set()
        assert len(workers) == 2 and proc.poll() is None, "both Ray workers should be running a task"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's process group, as a Ctrl-C'd shell or a scheduler
        proc.wait()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers), "Ray workers outlived the driver"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.multiprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_ray_worker_exits_when_its_driver_process_is_gone():
    ray = pytest.importorskip("ray")
    from lmforge.data.executor import _RayWorker

    # A stand-in driver we can kill; the real driver (this process) stays alive throughout.
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    started = Path(f"/proc/{stand_in.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(num_cpus=1)(_RayWorker).remote(None, (os.uname().nodename, stand_in.pid, started))
        worker_pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        time.sleep(1.5)
        assert alive(worker_pid), "the worker must live while its driver does"
        stand_in.kill()
        stand_in.wait()
        deadline = time.monotonic() + 20
        while alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(worker_pid)
    finally:
        stand_in.kill()
        ray.shutdown()
