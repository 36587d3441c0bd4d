// Drive npm @runware/sdk-js 1.3.2 (`RunwareServer`) against a server, as a user would.
//
//   node tests/e2e/js/client.mjs --url ws://127.0.0.1:PORT/v1 --api-key test-key < plan.json
//
// The plan (JSON on stdin) is the same as for the Python clients (tests/e2e/clients/_plan.py):
//   {"steps": [{"name": "up", "op": "imageUpload", "args": {"image": "data:image/png;base64,..."}},
//              {"name": "x2", "op": "upscale", "args": {"inputImage": "${up.imageUUID}", "upscaleFactor": 2}}]}
// A string "${step.field}" is replaced by that field of an earlier step's result (the first item of a
// list). Every step runs, with its own bounded timeout ("timeout", seconds, default 120), and the
// program prints ONE JSON object on stdout:
//   {"sdk": "@runware/sdk-js", "version": "1.3.2", "connect": {"ok": true, "seconds": ...},
//    "steps": {"up": {"ok": true, "seconds": ..., "result": {...}}, "x2": {"ok": false, "error": {...}}},
//    "disconnect": {...}}
//
// Operations ("op"):
//   imageUpload  runware.imageUpload({image})                       -> the upload item
//   upscale      runware.upscale(args)   (deliveryMethod "sync" or "async"; with "async" the SDK polls
//                getResponse every 2 s itself; add skipResponse: true to get the ACK instead)
//   getResponse  runware.getResponse({taskUUID})                    -> the list of items
//   poll         runware.getResponse({taskUUID}) every 0.2 s until an item has status "success"
//
// Errors: the SDK rejects with {error: {code, message, ...}} for server errors; they are reported as
// {"type": "ApiError", "code": ..., "message": ..., "error": {...}}; other throwables by name/message.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { RunwareServer, SDK_VERSION } from "@runware/sdk-js";

const DEFAULT_STEP_TIMEOUT_S = 120;
const REF = /^\$\{([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)\}$/;

// Anything printed by the SDK goes to stderr: stdout carries the one JSON report.
console.log = console.error;
console.info = console.error;
console.warn = console.error;

function resolve(value, results) {
  if (Array.isArray(value)) return value.map((item) => resolve(item, results));
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, resolve(v, results)]));
  }
  const match = typeof value === "string" ? REF.exec(value) : null;
  if (!match) return value;
  let result = results[match[1]];
  if (Array.isArray(result)) result = result[0];
  if (result === undefined || !(match[2] in result)) throw new Error(`unresolved reference ${value}`);
  return result[match[2]];
}

function describeError(err) {
  if (err && typeof err === "object" && err.error && typeof err.error === "object") {
    return { type: "ApiError", code: err.error.code, message: err.error.message, error: err.error };
  }
  if (err instanceof Error) return { type: err.name, message: err.message };
  return { type: typeof err, message: typeof err === "string" ? err : JSON.stringify(err) };
}

async function timed(promiseFactory, timeoutS) {
  const started = performance.now();
  const seconds = () => Math.round(performance.now() - started) / 1000;
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject({ timeout: true, message: `step did not finish within ${timeoutS} s` }),
      timeoutS * 1000,
    );
  });
  try {
    const result = await Promise.race([promiseFactory(), timeout]);
    return [{ ok: true, seconds: seconds() }, result];
  } catch (err) {
    const error = err?.timeout ? { type: "Timeout", message: err.message } : describeError(err);
    return [{ ok: false, seconds: seconds(), error }, undefined];
  } finally {
    clearTimeout(timer);
  }
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

async function main() {
  const { values: options } = parseArgs({
    options: { url: { type: "string" }, "api-key": { type: "string" } },
  });
  if (!options.url || !options["api-key"]) throw new Error("--url and --api-key are required");
  const plan = JSON.parse(readFileSync(0, "utf8"));
  const report = { sdk: "@runware/sdk-js", version: SDK_VERSION, steps: {} };

  let runware;
  [report.connect] = await timed(async () => {
    runware = await RunwareServer.initialize({
      apiKey: options["api-key"],
      url: options.url,
      timeoutDuration: DEFAULT_STEP_TIMEOUT_S * 1000,
    });
  }, plan.connect_timeout ?? 60);

  const ops = {
    imageUpload: (args) => runware.imageUpload(args),
    upscale: (args) => runware.upscale(args),
    getResponse: (args) => runware.getResponse(args),
    poll: async (args) => {
      for (;;) {
        const items = await runware.getResponse({ taskUUID: args.taskUUID });
        if ((items ?? []).some((item) => item.status === "success")) return items;
        await sleep(200);
      }
    },
  };

  const results = {};
  for (const step of plan.steps) {
    if (!runware) {
      report.steps[step.name] = { ok: false, seconds: 0, error: { type: "NotConnected", message: "connect failed" } };
      continue;
    }
    let args;
    try {
      args = resolve(step.args ?? {}, results);
    } catch (err) {
      report.steps[step.name] = { ok: false, seconds: 0, error: { type: "UnresolvedRef", message: err.message } };
      continue;
    }
    const [outcome, result] = await timed(() => ops[step.op](args), step.timeout ?? DEFAULT_STEP_TIMEOUT_S);
    if (outcome.ok) {
      outcome.result = result;
      results[step.name] = result;
    }
    report.steps[step.name] = outcome;
  }

  [report.disconnect] = await timed(async () => runware?.disconnect(), 30);
  return report;
}

main().then(
  (report) => process.stdout.write(`${JSON.stringify(report)}\n`, () => process.exit(0)),
  (err) => {
    console.error(err);
    process.exit(2);
  },
);
