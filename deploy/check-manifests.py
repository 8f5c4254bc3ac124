#!/usr/bin/env python3
"""Checks of deploy/ that need more than a shell: run by deploy/check.sh with the
venv's python (PyYAML comes with kubernetes-validate).

    check-manifests.py render DIR                 render a kustomization (fallback when
                                                  neither kubectl nor kustomize is installed)
    check-manifests.py compare RENDERED DIR       RENDERED (kubectl kustomize) equals `render DIR`
    check-manifests.py policy NATIVE LEGACY       sidecar wiring, probes, security, grace period
    check-manifests.py check-config RENDERED BINARY
                                                  the ConfigMap's data passes BINARY --check-config
    check-manifests.py docker-context             the build context that Dockerfile.dockerignore
                                                  leaves holds every COPY source, and cargo can
                                                  load the crate from it (offline, --locked)

The fallback renderer supports exactly what deploy/kubernetes uses: `resources`
(files and directories), `configMapGenerator` (envs, files, literals; without the
name hash), JSON 6902 `patches` given inline, and `images`. Anything else is an
error rather than a silently different rendering.
"""

import fnmatch
import os
import shutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SIDECAR = "idemproxy"
# Where deployment.yaml mounts the Secret with the upstream TLS files.
TLS_MOUNT = "/etc/idemproxy/tls/"
# Margin that terminationGracePeriodSeconds must leave above IDEMPROXY_DRAIN_TIMEOUT.
GRACE_MARGIN_S = 10

failures: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"FAIL: {msg}", file=sys.stderr)


def finish(what: str) -> int:
    if failures:
        print(f"{what}: {len(failures)} problem(s)", file=sys.stderr)
        return 1
    print(f"{what}: ok")
    return 0


# --------------------------------------------------------------------------- render


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def parse_env_file(path: Path) -> dict[str, str]:
    data = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise SystemExit(f"{path}:{n}: not KEY=VALUE: {line!r}")
        key, value = line.split("=", 1)
        data[key] = value
    return data


def pointer(doc, path: str):
    """Parent container and last key of a JSON pointer."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    return node, (len(node) if last == "-" else int(last)) if isinstance(node, list) else last


def json6902(doc: dict, ops: list[dict]) -> None:
    for op in ops:
        kind = op["op"]
        if kind == "move":
            parent, key = pointer(doc, op["from"])
            value = parent.pop(key)
            kind, op = "add", {"path": op["path"], "value": value}
        parent, key = pointer(doc, op["path"])
        if kind == "remove":
            del parent[key]
        elif kind == "add" and isinstance(parent, list):
            parent.insert(key, op["value"])
        elif kind in ("add", "replace"):
            parent[key] = op["value"]
        else:
            raise SystemExit(f"unsupported JSON 6902 op {kind!r}")


def render(directory: Path) -> list[dict]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "images"}
    if set(k) - known:
        raise SystemExit(f"{directory}: the fallback renderer does not support {sorted(set(k) - known)}")
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        docs += render(path) if path.is_dir() else load_docs(path)
    for gen in k.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env in gen.get("envs", []):
            data.update(parse_env_file(directory / env))
        for item in gen.get("files", []):
            key, _, file = item.rpartition("=")
            data[key or Path(file).name] = (directory / file).read_text()
        for item in gen.get("literals", []):
            key, value = item.split("=", 1)
            data[key] = value
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for patch in k.get("patches", []):
        target = patch.get("target", {})
        ops = yaml.safe_load(patch["patch"])
        if not isinstance(ops, list):
            raise SystemExit(f"{directory}: only inline JSON 6902 patches are supported")
        for doc in docs:
            if doc.get("kind") == target.get("kind") and doc["metadata"]["name"] == target.get("name"):
                json6902(doc, ops)
    for image in k.get("images", []):
        for doc in docs:
            for c in containers(doc):
                name, _, _ = c.get("image", "").partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


def generator_names(directory: Path) -> list[str]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    names = [g["name"] for g in k.get("configMapGenerator", [])]
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            names += generator_names(path)
    return names


def normalize(docs: list[dict]) -> list[dict]:
    # kubectl ordering is by kind; compare as a sorted list.
    return sorted(docs, key=lambda d: (d.get("kind", ""), d.get("metadata", {}).get("name", "")))


def cmd_compare(rendered: Path, directory: Path) -> int:
    text = rendered.read_text()
    for name in generator_names(directory):
        text = re.sub(rf"\b{re.escape(name)}-[a-z0-9]{{10}}\b", name, text)
    a = normalize([d for d in yaml.safe_load_all(text) if d])
    b = normalize(render(directory))
    if a != b:
        fail(f"{directory}: the fallback renderer differs from kubectl kustomize:\n"
             + yaml.safe_dump_all(a) + "\n----- fallback -----\n" + yaml.safe_dump_all(b))
    return finish(f"fallback renderer matches kubectl kustomize for {directory.relative_to(ROOT)}")


# --------------------------------------------------------------------------- policy


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def parse_duration_s(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text.strip())
    if not m:
        fail(f"cannot read the duration {text!r}")
        return 0.0
    return float(m[1]) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m[2]]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def check_variant(path: Path, native: bool) -> None:
    docs = load_docs(path)
    where = f"{path.name}"
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in by_kind(docs, "ConfigMap")}
    services = by_kind(docs, "Service")
    for dep in by_kind(docs, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        inits = spec.get("initContainers", [])
        regular = spec.get("containers", [])
        sidecars = [c for c in inits + regular if c["name"] == SIDECAR]
        if len(sidecars) != 1:
            fail(f"{where}: expected one {SIDECAR} container, found {len(sidecars)}")
            continue
        side = sidecars[0]
        if native:
            if side not in inits or side.get("restartPolicy") != "Always":
                fail(f"{where}: {SIDECAR} must be an initContainers entry with restartPolicy: Always")
        else:
            if regular[:1] != [side] or "restartPolicy" in side or inits:
                fail(f"{where}: {SIDECAR} must be the first of containers, with no restartPolicy")
        # Configuration comes from the ConfigMap.
        refs = [e["configMapRef"]["name"] for e in side.get("envFrom", []) if "configMapRef" in e]
        if not refs or any(r not in configmaps for r in refs):
            fail(f"{where}: {SIDECAR} envFrom {refs} must name the rendered ConfigMap(s) {list(configmaps)}")
        config = {k: v for r in refs for k, v in configmaps.get(r, {}).items()}
        # Admin port, probes, Service and scrape annotation agree with IDEMPROXY_ADMIN_LISTEN.
        admin = config.get("IDEMPROXY_ADMIN_LISTEN", "0.0.0.0:7481").rsplit(":", 1)[1]
        ports = {p.get("name"): p["containerPort"] for p in side.get("ports", [])}
        if str(ports.get("admin")) != admin:
            fail(f"{where}: port `admin` is {ports.get('admin')}, IDEMPROXY_ADMIN_LISTEN says {admin}")
        for probe, path_ in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", None)]:
            get = side.get(probe, {}).get("httpGet", {})
            if get.get("port") != "admin" or (path_ and get.get("path") != path_):
                fail(f"{where}: {probe} must be an httpGet on port `admin`" + (f" path {path_}" if path_ else ""))
        ann = dep["spec"]["template"]["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != admin:
            fail(f"{where}: prometheus.io/scrape and prometheus.io/port={admin} annotations expected")
        if not any(p.get("name") == "admin" and str(p.get("targetPort")) in ("admin", admin)
                   for s in services for p in s["spec"]["ports"]):
            fail(f"{where}: a Service port named `admin` (for a ServiceMonitor) expected")
        # Resources: requests and limits for CPU and memory.
        res = side.get("resources", {})
        for part in ("requests", "limits"):
            for what in ("cpu", "memory"):
                if what not in res.get(part, {}):
                    fail(f"{where}: {SIDECAR} resources.{part}.{what} missing")
        # Security context of every container (pod-level values count too).
        pod_sc = spec.get("securityContext", {})
        for c in inits + regular:
            sc = c.get("securityContext", {})
            merged = {**pod_sc, **sc}
            wanted = {"runAsNonRoot": True, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}
            for key, value in wanted.items():
                if merged.get(key) is not value:
                    fail(f"{where}: container {c['name']}: securityContext.{key} must be {value}")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                fail(f"{where}: container {c['name']}: capabilities.drop must be [ALL]")
            if merged.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                fail(f"{where}: container {c['name']}: seccompProfile RuntimeDefault expected")
        # TLS files come from a read-only Secret mount.
        mounts = {m["mountPath"].rstrip("/") + "/": m for m in side.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for key in ("IDEMPROXY_UPSTREAM_CA_FILE", "IDEMPROXY_UPSTREAM_CLIENT_CERT", "IDEMPROXY_UPSTREAM_CLIENT_KEY"):
            value = config.get(key, "")
            mount = next((m for p, m in mounts.items() if value.startswith(p)), None)
            if not mount or not mount.get("readOnly") or "secret" not in volumes.get(mount["name"], {}):
                fail(f"{where}: {key}={value!r} must point into a read-only Secret mount")
        # The grace period outlasts the drain.
        drain = parse_duration_s(config.get("IDEMPROXY_DRAIN_TIMEOUT", "20s"))
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace < drain + GRACE_MARGIN_S:
            fail(f"{where}: terminationGracePeriodSeconds {grace} must be at least "
                 f"IDEMPROXY_DRAIN_TIMEOUT ({drain:g}s) + {GRACE_MARGIN_S}s")
        # The agent is pointed at the sidecar's traffic listener.
        listen = config.get("IDEMPROXY_LISTEN", "127.0.0.1:7480")
        if not any(f"http://{listen}" in str(e.get("value", "")) for c in regular if c is not side
                   for e in c.get("env", [])):
            fail(f"{where}: the agent's backend URL should be http://{listen}")


def cmd_policy(native: Path, legacy: Path) -> int:
    check_variant(native, native=True)
    check_variant(legacy, native=False)
    return finish("manifest policy (sidecar, probes, ports, security, resources, grace)")


# --------------------------------------------------------------------------- binary


def throwaway_tls(directory: Path) -> None:
    """A self-signed certificate and key, so the files are real PEM (openssl if present)."""
    key, crt = directory / "tls.key", directory / "tls.crt"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "1", "-subj", "/CN=idemproxy-check", "-keyout", str(key),
                        "-out", str(crt)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        key.write_text("")
        crt.write_text("")


def cmd_check_config(rendered: Path, binary: Path) -> int:
    docs = load_docs(rendered)
    cms = by_kind(docs, "ConfigMap")
    if not cms:
        fail(f"{rendered}: no ConfigMap")
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        throwaway_tls(tmpdir)
        for cm in cms:
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
            for key, value in cm.get("data", {}).items():
                if value.startswith(TLS_MOUNT):
                    # A file of the Secret mount: point at a throwaway file of the same kind.
                    name = Path(value).name
                    source = tmpdir / ("tls.key" if name.endswith(".key") else "tls.crt")
                    target = tmpdir / "mount" / name
                    target.parent.mkdir(exist_ok=True)
                    target.write_bytes(source.read_bytes())
                    value = str(target)
                env[key] = value
            env.setdefault("IDEMPROXY_UPSTREAM", "https://upstream.invalid:8443")
            out = subprocess.run([str(binary), "--check-config"], env=env, capture_output=True, text=True)
            name = cm["metadata"]["name"]
            if out.returncode != 0:
                fail(f"ConfigMap {name}: idemproxy --check-config exited {out.returncode}:\n{out.stderr}")
            else:
                print(f"ConfigMap {name}: --check-config accepted {len(cm.get('data', {}))} variables")
    return finish("ConfigMap passes idemproxy --check-config")


def ignored(rel: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's .dockerignore for simple patterns: a pattern matching the path or
    one of its parent directories excludes it; a later `!pattern` re-includes."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for negate, pattern in rules:
        pattern = pattern.strip("/")
        if any(fnmatch.fnmatchcase(p, pattern) or (pattern.startswith("**/") and
               fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pattern[3:])) for p in prefixes):
            result = not negate
    return result


def cmd_docker_context() -> int:
    rules = []
    for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!")))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Path(tmp) / "context"
        count = 0
        for dirpath, dirnames, filenames in os.walk(ROOT):
            rel_dir = os.path.relpath(dirpath, ROOT)
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            # Prune excluded directories unless a negation could re-include below them.
            if not any(neg for neg, _ in rules):
                dirnames[:] = [d for d in dirnames if not ignored(rel_dir + d, rules)]
            for name in filenames:
                rel = rel_dir + name
                if not ignored(rel, rules):
                    (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / rel, ctx / rel)
                    count += 1
        for line in (DEPLOY / "Dockerfile").read_text().splitlines():
            words = line.split()
            if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
                for src in [w for w in words[1:-1] if not w.startswith("--")]:
                    if not (ctx / src).exists():
                        fail(f"Dockerfile: COPY {src}: not in the build context")
        # Files cargo needs that `cargo fetch` does not open: the lock file and the
        # explicit target paths of Cargo.toml ([lib], [[bin]], ...). Also the
        # manifests of the workspace members (testkit/), named here because cargo
        # loads them for any command, `cargo build --bin idemproxy` too.
        manifest = (ROOT / "Cargo.toml").read_text()
        members = re.search(r'^members\s*=\s*\[([^\]]*)\]', manifest, re.M)
        needed = (["Cargo.toml", "Cargo.lock"]
                  + re.findall(r'^path\s*=\s*"([^"]+)"', manifest, re.M)
                  + [f"{m}/Cargo.toml" for m in re.findall(r'"([^"]+)"', members[1] if members else "")])
        for rel in needed:
            if not (ctx / rel).exists():
                fail(f"Dockerfile.dockerignore leaves {rel} out of the build context")
        host = re.search(r"^host: (\S+)", subprocess.run(["rustc", "-vV"], capture_output=True, text=True,
                                                          check=True).stdout, re.M)[1]
        out = subprocess.run(["cargo", "fetch", "--locked", "--target", host], cwd=ctx,
                             capture_output=True, text=True)
        if out.returncode != 0:
            fail(f"cargo cannot load the crate from the Docker build context:\n{out.stderr}")
    return finish(f"Docker build context ({count} files) holds the crate")


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "render":
        sys.stdout.write(yaml.safe_dump_all(render(Path(argv[1])), sort_keys=True))
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        return cmd_compare(Path(argv[1]), Path(argv[2]).resolve())
    if len(argv) == 3 and argv[0] == "policy":
        return cmd_policy(Path(argv[1]), Path(argv[2]))
    if argv == ["docker-context"]:
        return cmd_docker_context()
    if len(argv) == 3 and argv[0] == "check-config":
        return cmd_check_config(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
