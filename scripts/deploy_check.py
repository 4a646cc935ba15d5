"""Checks deploy/ without a cluster or Docker (scripts/deploy-check.sh runs it).

- The Helm chart: `helm lint --strict` and offline rendering with Helm's own engine
  (helm-python-sdk, Helm v4 as a library), for several value sets; every rendered
  manifest of a built-in kind validated against Kubernetes' OpenAPI schemas
  (kubernetes-validate, strict: unknown fields are errors); custom resources
  (ServiceMonitor) checked for their required fields; and what the chart promises
  (GPU requests, probes, grace period above the shutdown timeout, preStop, the token
  from a Secret, the HPA's metric, the ServiceMonitor's token) asserted.
- Value sets the chart must refuse (replicas without a shared store, no API token).
- deploy/examples/*.yaml: parsed; built-in kinds validated; CRDs checked for shape.
- Both Dockerfiles linted with hadolint.
Ends with "deploy: N passed, M failed".
"""

import glob
import subprocess
import sys

import helm_python
import kubernetes_validate
import yaml

CHART = "deploy/helm/hearth"
KUBE = "1.30.0"
BUILTIN = ("v1", "apps/v1", "policy/v1", "autoscaling/v2")
passed, failed = 0, 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        print(f"ok   {name}")
        passed += 1
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        print(f"FAIL {name}: {type(e).__name__}: {e}")
        failed += 1


def render(values):
    out = helm_python.Chart.load(CHART).render(values, name="hearth", namespace="ai")
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def validate(docs):
    for d in docs:
        if d["apiVersion"] in BUILTIN:
            kubernetes_validate.validate(d, KUBE, strict=True)
        else:
            for key in ("apiVersion", "kind", "metadata", "spec"):
                assert key in d, f"{d.get('kind')}: no {key}"
            assert d["metadata"].get("name"), f"{d['kind']}: no name"


def by_kind(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert found, f"no {kind}"
    return found[0]


def env(container, name):
    for e in container.get("env", []):
        if e["name"] == name:
            return e
    return None


BASE = {"auth": {"tokens": ["t0k"]}, "store": {"url": "postgres://hearth:pw@db:5432/hearth"}}


def gpu_replicas():
    docs = render(BASE)
    validate(docs)
    dep = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert dep["spec"]["replicas"] == 2
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    # Status-code probes on /health (503 until the models serve); liveness on
    # /health-check, which answers 200 whatever the state.
    for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/health"),
                        ("livenessProbe", "/health-check")):
        assert c[probe]["httpGet"]["path"] == path, (probe, c[probe])
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 900, c["startupProbe"]
    assert pod["terminationGracePeriodSeconds"] > 30 + 10, pod["terminationGracePeriodSeconds"]
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    assert env(c, "HEARTH_API_TOKEN")["valueFrom"]["secretKeyRef"]["key"] == "api-tokens"
    assert env(c, "HEARTH_STORE")["valueFrom"]["secretKeyRef"]["key"] == "store-url"
    assert env(c, "HEARTH_HOST")["value"] == "0.0.0.0"
    # The Service's in-cluster names are Host names the pods answer to (others: 403).
    hosts = env(c, "HEARTH_ALLOWED_HOSTS")["value"].split(",")
    assert "hearth" in hosts and "hearth.ai.svc.cluster.local" in hosts, hosts
    assert pod["securityContext"]["runAsNonRoot"] is True
    secret = by_kind(docs, "Secret")
    assert secret["stringData"] == {"api-tokens": "t0k", "store-url": BASE["store"]["url"]}
    assert by_kind(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert by_kind(docs, "Service")["spec"]["ports"][0]["targetPort"] == "http"


def autoscaled_with_monitor_and_trial_postgres():
    docs = render({
        "auth": {"tokens": ["a", "b"]},
        "postgresql": {"enabled": True, "password": "pw"},
        "autoscaling": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "gpu": {"enabled": False},
        "shutdownTimeout": 120,
    })
    validate(docs)
    dep = by_kind(docs, "Deployment")
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    pod = dep["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 120
    assert "nvidia.com/gpu" not in str(pod["containers"][0]["resources"])
    hpa = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    sm = by_kind(docs, "ServiceMonitor")
    ep = sm["spec"]["endpoints"][0]
    assert ep["path"] == "/metrics" and ep["authorization"]["type"] == "Bearer", ep
    assert by_kind(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["image"].startswith("postgres:")
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert secrets["hearth"]["stringData"]["store-url"] == "postgres://hearth:pw@hearth-postgresql:5432/hearth"
    # Tokens are separated by whitespace (a comma may be part of a token).
    assert secrets["hearth"]["stringData"]["api-tokens"] == "a b"


def one_replica_on_sqlite_with_public_metrics():
    docs = render({
        "auth": {"existingSecret": "my-tokens"},
        "replicaCount": 1,
        "gpu": {"enabled": False},
        "dataVolume": {"persistentVolumeClaim": "hearth-data"},
        "metrics": {"public": True, "serviceMonitor": {"enabled": True}},
    })
    validate(docs)
    c = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert env(c, "HEARTH_STORE") is None, "SQLite: no store URL"
    assert env(c, "HEARTH_METRICS_PUBLIC")["value"] == "true"
    assert env(c, "HEARTH_API_TOKEN")["valueFrom"]["secretKeyRef"]["name"] == "my-tokens"
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"], "one replica: no PDB"
    assert not [d for d in docs if d["kind"] == "Secret"], "nothing for the chart's Secret to hold"
    assert "authorization" not in by_kind(docs, "ServiceMonitor")["spec"]["endpoints"][0]


def upstreams_with_tokens_from_secrets():
    docs = render({**BASE,
        "upstreams": [
            {"name": "hosted", "url": "https://api.replicate.com", "tokenSecret": "replicate-token"},
            {"name": "my-box", "url": "cog+http://cog:5000"},
        ],
        "routes": ["acme/image=upstream:hosted", "hearth/demo=fallback:my-box"],
        "mirrorUpstreamFiles": True,
    })
    validate(docs)
    c = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert env(c, "HEARTH_UPSTREAM")["value"] == "hosted=https://api.replicate.com,my-box=cog+http://cog:5000"
    ref = env(c, "HEARTH_UPSTREAM_TOKEN_HOSTED")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "replicate-token", "key": "token"}, ref
    assert env(c, "HEARTH_UPSTREAM_TOKEN_MY_BOX") is None, "no tokenSecret: no token"
    assert env(c, "HEARTH_ROUTE")["value"] == "acme/image=upstream:hosted,hearth/demo=fallback:my-box"
    assert env(c, "HEARTH_MIRROR_UPSTREAM_FILES")["value"] == "true"
    plain = by_kind(render(BASE), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert env(plain, "HEARTH_UPSTREAM") is None and env(plain, "HEARTH_ROUTE") is None


def refused(values, words):
    def run():
        try:
            render(values)
        except Exception as e:  # noqa: BLE001
            assert all(w in str(e) for w in words), str(e)
            return
        raise AssertionError("rendered")
    return run


def lint():
    r = helm_python.lint(CHART, BASE, strict=True)
    errs = [m for m in r["messages"] if m["severity"] >= 2] + r["errors"]
    assert not errs, errs


def probe_paths(node):
    """Every httpGet path of a probe anywhere in a manifest."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k.endswith("Probe") and isinstance(v, dict) and "httpGet" in v:
                yield k, v["httpGet"]["path"]
            else:
                yield from probe_paths(v)
    elif isinstance(node, list):
        for v in node:
            yield from probe_paths(v)


def examples():
    for path in sorted(glob.glob("deploy/examples/*.yaml")):
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        assert docs, path
        validate(docs)
        for probe, p in probe_paths(docs):
            want = "/health-check" if probe == "livenessProbe" else "/health"
            assert p == want, (path, probe, p)
    kinds = {d["kind"] for p in glob.glob("deploy/examples/*.yaml") for d in yaml.safe_load_all(open(p)) if d}
    assert {"InferencePool", "HTTPRoute", "ServingRuntime", "InferenceService"} <= kinds, kinds


def dockerfile_healthchecks():
    for path in ("deploy/Dockerfile", "deploy/Dockerfile.cuda"):
        text = open(path).read()
        assert "/health >/dev/null" in text and "/health-check" not in text.split("HEALTHCHECK", 1)[1], path


def hadolint():
    r = subprocess.run(
        [sys.executable.replace("python", "hadolint"), "--failure-threshold", "warning",
         "--ignore", "DL3008", "deploy/Dockerfile", "deploy/Dockerfile.cuda"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


check("helm lint --strict", lint)
check("render: 2 GPU replicas on an external PostgreSQL", gpu_replicas)
check("render: autoscaled on the queue gauge, ServiceMonitor with the token, trial PostgreSQL",
      autoscaled_with_monitor_and_trial_postgres)
check("render: one replica on SQLite, public metrics, tokens from an existing Secret",
      one_replica_on_sqlite_with_public_metrics)
check("render: upstreams with tokens from Secrets, routes, mirrored files", upstreams_with_tokens_from_secrets)
check("refused: replicas without a shared store",
      refused({"auth": {"tokens": ["t"]}, "replicaCount": 3}, ["shared store", "404"]))
check("refused: no API token", refused({"store": {"url": "postgres://x@y/z"}}, ["API token"]))
check("refused: trial PostgreSQL without a password",
      refused({"auth": {"tokens": ["t"]}, "postgresql": {"enabled": True}}, ["password"]))
check("examples: InferencePool, HTTPRoute, KServe", examples)
check("Dockerfiles: HEALTHCHECK on /health (503 until the models serve)", dockerfile_healthchecks)
check("hadolint deploy/Dockerfile deploy/Dockerfile.cuda (DL3008 apt pins ignored)", hadolint)
print(f"deploy: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
