#!/usr/bin/env bash
# The Istio install end to end on a local kind cluster, for anyone with Docker:
#   1. create the cluster (kind-cluster.yaml)   2. install Istio (istioctl, minimal profile)
#   3. build both images and load them into kind   4. CRDs, then the install (istio/)
#   5. provider keys as Secrets   6. the sample services and their AIPolicies (istio/samples/)
#   7. show the CRs' status columns and what each sample service's calls did.
#
# Needs: docker, kind, kubectl, istioctl on PATH. Provider keys: export OPENAI_API_KEY and
# ANTHROPIC_API_KEY for real answers; without them the providers answer 401, and the log lines
# still show the mesh at work (x-ai-* headers, the 403 for a model outside a policy).
# Re-running is safe; `kind delete cluster --name ai-mesh` removes everything.
# (This script cannot run on machines without a Docker engine; the test suite covers what it
# can without a cluster: see README, "Install into Istio".)
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=ai-mesh
IMAGE=ai-mesh-extproc:0.1.0
SAMPLES_IMAGE=ai-mesh-extproc-samples:0.1.0

for tool in docker kind kubectl istioctl; do
  command -v "$tool" >/dev/null || { echo "kind-demo: $tool is required" >&2; exit 1; }
done

step() { printf '\n==> %s\n' "$*"; }

step "cluster"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --config kind-cluster.yaml
kubectl config use-context "kind-$CLUSTER" >/dev/null

step "Istio"
istioctl install -y --set profile=minimal
kubectl -n istio-system rollout status deploy/istiod --timeout=300s

step "images"
docker build -t "$IMAGE" .
docker build -t "$SAMPLES_IMAGE" --target samples .
kind load docker-image --name "$CLUSTER" "$IMAGE" "$SAMPLES_IMAGE"

step "CRDs (first, so the objects below have their kinds)"
kubectl apply -f istio/crds.yaml
kubectl wait --for condition=established --timeout=60s crd/aipolicies.ai.extproc.io crd/aiproviders.ai.extproc.io

step "provider keys"
kubectl apply -f istio/namespace.yaml
kubectl -n ai-system create secret generic openai-api-key --from-literal=api-key="${OPENAI_API_KEY:-sk-not-set}" \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl -n ai-system create secret generic claude-api-key --from-literal=api-key="${ANTHROPIC_API_KEY:-sk-ant-not-set}" \
  --dry-run=client -o yaml | kubectl apply -f -
# Shared by the processor replicas: signs the fallback state a call carries between them. Created
# once; re-running the script keeps the existing key.
kubectl -n ai-system get secret ai-extproc-signing-key >/dev/null 2>&1 || \
  kubectl -n ai-system create secret generic ai-extproc-signing-key --from-literal=key="$(openssl rand -hex 32)"

step "processor, EnvoyFilter, providers, egress gateway, access policies"
# The install's REGISTRY_ONLY Sidecar lives in the client namespace (client-namespaces.yaml): create it first.
kubectl apply -f istio/samples/namespace.yaml
kubectl apply -k istio/
kubectl -n ai-system rollout status deploy/ai-extproc --timeout=300s

step "sample services and their AIPolicies"
kubectl apply -k istio/samples/
for service in user-service product-service order-service; do
  kubectl -n ai-demo rollout status "deploy/$service" --timeout=300s
done

step "policy objects (State/Reason are written back by the processor)"
kubectl get aiproviders -n ai-system -o wide
kubectl get aipolicies -A -o wide

step "a bad policy is refused in its status; the others keep serving"
kubectl -n ai-demo apply -f - <<'YAML'
apiVersion: ai.extproc.io/v1alpha1
kind: AIPolicy
metadata: {name: billing-service}
spec:
  service: billing-service
  ai_proxy:
    models: [{name: invoices, provider: gemini, model: gemini-pro}]
YAML
sleep 3
kubectl -n ai-demo get aipolicy billing-service -o wide

step "what the sample services' calls did (one JSON line per call)"
sleep 20
for service in user-service product-service order-service; do
  echo "--- $service"
  kubectl -n ai-demo logs "deploy/$service" --tail=4
done
