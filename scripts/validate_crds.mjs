// Validates the custom resources in rendered manifests against the CRD schemas
// shipped by @kubernetes-models (kubernetes-validate only warns about them).
//
//   NODE_PATH=<dir>/node_modules node scripts/validate_crds.mjs rendered.yaml...
//   node scripts/validate_crds.mjs --list-kinds    # "apiVersion kind" per line
//
// The npm packages live outside the repository (scripts/check_deploy.sh installs
// them into a temp dir), so they are loaded through require(), which honours
// NODE_PATH; ESM `import` does not.
//
// Fails on: a schema violation; a resource of a non-built-in API group with no
// schema here; a schema that accepts a deliberately broken copy of a resource
// (which would mean validation is not really running).

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const yaml = require("js-yaml");
const { PrometheusRule, ServiceMonitor } = require("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1");
const { ScaledObject } = require("@kubernetes-models/keda/keda.sh/v1alpha1");

const MODELS = new Map([
  ["monitoring.coreos.com/v1 ServiceMonitor", ServiceMonitor],
  ["monitoring.coreos.com/v1 PrometheusRule", PrometheusRule],
  ["keda.sh/v1alpha1 ScaledObject", ScaledObject],
]);

// Built-in groups have no dot ("apps", "policy", core "v1") or end in .k8s.io;
// those are kubernetes-validate's job.
function isBuiltIn(apiVersion) {
  if (!apiVersion.includes("/")) return true;
  const group = apiVersion.split("/")[0];
  return !group.includes(".") || group.endsWith(".k8s.io");
}

function describe(doc) {
  return `${doc.kind}/${doc.metadata?.name ?? "?"} (${doc.apiVersion})`;
}

function firstError(err) {
  const details = err?.errors?.[0];
  return details ? `${details.instancePath || "/"} ${details.message}` : String(err?.message ?? err);
}

function validateFile(path) {
  let failures = 0;
  const docs = yaml.loadAll(readFileSync(path, "utf8")).filter((doc) => doc != null);
  for (const doc of docs) {
    if (typeof doc.apiVersion !== "string" || typeof doc.kind !== "string") {
      console.error(`FAIL ${path}: document without apiVersion/kind`);
      failures++;
      continue;
    }
    const Model = MODELS.get(`${doc.apiVersion} ${doc.kind}`);
    if (!Model) {
      if (!isBuiltIn(doc.apiVersion)) {
        console.error(`FAIL ${path}: ${describe(doc)}: no schema for this custom resource`);
        failures++;
      }
      continue;
    }
    try {
      new Model(doc).validate();
    } catch (err) {
      console.error(`FAIL ${path}: ${describe(doc)}: ${firstError(err)}`);
      failures++;
      continue;
    }
    // Negative control: the same resource with a non-object spec must be rejected.
    let rejected = false;
    try {
      new Model({ ...doc, spec: "not-an-object" }).validate();
    } catch {
      rejected = true;
    }
    if (!rejected) {
      console.error(`FAIL ${path}: ${describe(doc)}: schema accepted a broken spec; validation is not active`);
      failures++;
      continue;
    }
    console.log(`ok   ${path}: ${describe(doc)}`);
  }
  return failures;
}

const args = process.argv.slice(2);
if (args[0] === "--list-kinds") {
  for (const key of MODELS.keys()) console.log(key);
  process.exit(0);
}
if (args.length === 0) {
  console.error("usage: validate_crds.mjs [--list-kinds] FILE...");
  process.exit(2);
}
let failures = 0;
for (const path of args) failures += validateFile(path);
process.exit(failures === 0 ? 0 : 1);
