// npm run bench:profile -- --scenario NAME [--top N] [--perf | --strace] [--local-observability] [--state-on-disk]
// Where a scenario's CPU goes: starts the bench's server, seeds and runs one scenario as the bench does, and
// during its load phase only (not the seeding) samples the Worker's isolate with V8's profiler, through wrangler
// dev's inspector (its Profiler domain over the WebSocket; the inspector wants the devtools Origin header). It
// also reads the CPU time every process used meanwhile (workerd runs the Worker, its objects and Miniflare's
// simulators; a second workerd is wrangler's proxy). Prints the functions with the most self time, the heaviest
// call paths, and those CPU times. The Worker isolate's profile does not include the simulators' own isolates.
import { execFileSync, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { couponStormSharded } from "./coupon-storm-sharded.mjs";
import { cancelStorm } from "./cancel-storm.mjs";
import { loadHooks } from "./load.mjs";
import { processCpu, workerdPids } from "./processes.mjs";
import { mixed } from "./mixed.mjs";
import { catalogDetail, catalogList, chargeStorm, floor } from "./reads.mjs";
import { scenarioContext } from "./seed.mjs";
import { benchStateDir, removeState, startBenchServer } from "./server.mjs";
import { couponStorm, orderStorm, orderStormKeyed } from "./storms.mjs";
import { ensureDevVars, readDevVars } from "../scripts/local.mjs";
import { SIZES } from "./sizes.mjs";

const SCENARIOS = [floor, catalogList, catalogDetail, chargeStorm, couponStorm, couponStormSharded, orderStorm, orderStormKeyed, cancelStorm, mixed];
const INSPECTOR = "http://127.0.0.1:9229/json";

function parseArgs(argv) {
  const options = { scenario: null, top: 30, tracer: null, localObservability: process.env.X_LOCAL_OBSERVABILITY === "true", stateOnDisk: false };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--scenario") options.scenario = argv[++i];
    else if (argv[i] === "--perf") options.tracer = "perf";
    else if (argv[i] === "--strace") options.tracer = "strace";
    else if (argv[i] === "--local-observability") options.localObservability = true;
    else if (argv[i] === "--state-on-disk") options.stateOnDisk = true;
    else if (argv[i] === "--top") options.top = Number(argv[++i]);
    else fail(`unknown argument ${argv[i]}`);
  }
  const scenario = SCENARIOS.find((s) => s.name === options.scenario);
  if (!scenario) fail(`usage: npm run bench:profile -- --scenario ${SCENARIOS.map((s) => s.name).join("|")} [--top N] [--perf | --strace] [--local-observability] [--state-on-disk]`);
  return { ...options, scenario };
}

function fail(message) {
  console.error(message);
  process.exit(2);
}

async function connectProfiler() {
  const targets = await (await fetch(INSPECTOR)).json();
  const socket = new WebSocket(targets[0].webSocketDebuggerUrl, { headers: { Origin: "https://devtools.devprod.cloudflare.dev" } });
  let id = 0;
  const pending = new Map();
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    pending.get(message.id)?.(message.result);
    pending.delete(message.id);
  };
  await new Promise((resolve, reject) => {
    socket.onopen = resolve;
    socket.onerror = () => reject(new Error(`could not open the inspector at ${INSPECTOR}`));
  });
  const send = (method, params = {}) =>
    new Promise((resolve) => {
      pending.set(++id, resolve);
      socket.send(JSON.stringify({ id, method, params }));
    });
  return { send, close: () => socket.close() };
}

const frameName = (frame) => `${frame.functionName || "(anonymous)"} ${frame.url.split("/").at(-1) || ""}:${frame.lineNumber + 1}`;

function report(profile, top) {
  const nodes = new Map(profile.nodes.map((n) => [n.id, n]));
  const hits = new Map();
  for (const sample of profile.samples) hits.set(sample, (hits.get(sample) ?? 0) + 1);
  const total = profile.samples.length;
  const pct = (n) => `${((100 * n) / total).toFixed(1).padStart(5)}%`;

  const self = new Map();
  for (const [id, n] of hits) {
    const name = frameName(nodes.get(id).callFrame);
    self.set(name, (self.get(name) ?? 0) + n);
  }
  console.log(`\nSelf time, top ${top} (${total} samples):`);
  for (const [name, n] of [...self].sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`${pct(n)}  ${name}`);

  const subtree = new Map();
  const sizeOf = (id) => {
    if (!subtree.has(id)) subtree.set(id, (hits.get(id) ?? 0) + (nodes.get(id).children ?? []).reduce((sum, child) => sum + sizeOf(child), 0));
    return subtree.get(id);
  };
  console.log("\nCall paths of at least 1% (each line: the share of samples under it):");
  const walk = (id, depth) => {
    const share = sizeOf(id);
    if (share / total < 0.01 || depth > 16) return;
    const frame = nodes.get(id).callFrame;
    if (depth > 0) console.log(`${pct(share)}  ${"  ".repeat(depth - 1)}${frameName(frame)}`);
    for (const child of nodes.get(id).children ?? []) walk(child, depth + 1);
  };
  walk(profile.nodes[0].id, 0);
}

const PERF_DATA = "/tmp/bench-perf.data";
const STRACE_OUT = "/tmp/bench-strace.txt";

/**
 * A second tracer over the bench server's workerd processes during the load phase: `perf` samples native
 * time with call graphs (V8's GC, SQLite, the runtime); `strace` records the file writes and syncs (which
 * SQLite file of which simulator writes and fsyncs how often). Either is optional: if it cannot start or
 * stops early, the profile goes on without it and says why.
 */
function startTracer(tracer, group) {
  const pids = workerdPids(group);
  const args =
    tracer === "perf"
      ? ["record", "-F", "999", "-g", "-o", PERF_DATA, "-p", pids.join(",")]
      : ["-f", "-y", "-e", "trace=fsync,fdatasync,pwrite64,write", "-o", STRACE_OUT, ...pids.flatMap((p) => ["-p", p])];
  const child = spawn(tracer, args, { stdio: ["ignore", "ignore", "pipe"] });
  const run = { tracer, child, stderr: "", failed: null, stopping: false, exited: null };
  child.stderr.on("data", (chunk) => (run.stderr += chunk));
  run.exited = new Promise((resolve) => {
    child.once("error", (error) => {
      run.failed = error.message;
      resolve();
    });
    child.once("exit", (code, signal) => {
      if (code !== 0 && signal !== "SIGINT" && code !== 130 && !run.stopping) run.failed = `exited with ${code ?? signal}`;
      resolve();
    });
  });
  return run;
}

async function stopTracer(run) {
  run.stopping = true;
  if (run.child.exitCode === null && run.child.signalCode === null) run.child.kill("SIGINT");
  await run.exited;
}

function reportTracer({ tracer, failed, stderr }, top) {
  if (failed) {
    console.log(`\n${tracer} did not trace: ${failed}\n${stderr.trim().split("\n").slice(-5).join("\n")}`);
    return;
  }
  if (tracer === "strace") {
    const counts = new Map();
    for (const [, call, file] of readFileSync(STRACE_OUT, "utf8").matchAll(/(\w+)\(\d+<([^>]*)>/g)) {
      const key = `${call.padEnd(9)} ${file.replace(/[0-9a-f]{32,}/g, "<id>").replace(/#\d+/, "#<n>")}`;
      counts.set(key, (counts.get(key) ?? 0) + 1);
    }
    console.log("\nstrace, calls by syscall and file:");
    for (const [key, n] of [...counts].sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`${String(n).padStart(8)}  ${key}`);
    return;
  }
  for (const sort of ["pid,comm", "dso", "dso,sym"]) {
    const out = execFileSync("perf", ["report", "-i", PERF_DATA, "--stdio", "--no-children", "-g", "none", "--percent-limit", "0.5", "--sort", sort], {
      encoding: "utf8",
      maxBuffer: 64 << 20,
    });
    console.log(`\nperf, by ${sort}:`);
    console.log(out.split("\n").filter((l) => l && !l.startsWith("#")).slice(0, top).join("\n"));
  }
}

async function main() {
  const { scenario, top, tracer, localObservability, stateOnDisk } = parseArgs(process.argv.slice(2));
  ensureDevVars();
  const { JWT_SECRET: secret } = readDevVars();
  const stateDir = benchStateDir(`profile-${Date.now()}`, { onDisk: stateOnDisk });
  const server = await startBenchServer({ port: 8799, stateDir, localObservability });
  let profiler = null;
  let recorder = null;
  let cpuBefore = null;
  let loadStarted = 0;
  let loads = 0;
  loadHooks.before = async () => {
    if (loads++ > 0) return; // the scenario's first load phase only
    if (tracer) recorder = startTracer(tracer, server.group);
    profiler = await connectProfiler();
    await profiler.send("Profiler.enable");
    await profiler.send("Profiler.setSamplingInterval", { interval: 500 });
    await profiler.send("Profiler.start");
    cpuBefore = processCpu();
    loadStarted = performance.now();
  };
  let profile = null;
  let cpuAfter = null;
  let loadSeconds = 0;
  loadHooks.after = async () => {
    if (!profiler || profile) return;
    loadSeconds = (performance.now() - loadStarted) / 1000;
    cpuAfter = processCpu();
    if (recorder) await stopTracer(recorder);
    profile = (await profiler.send("Profiler.stop")).profile;
    profiler.close();
  };
  try {
    const ctx = await scenarioContext(server, secret, SIZES.default);
    const { load } = await scenario.run(ctx);
    console.log(`${scenario.name}: ${load.requests} requests in ${load.durationS} s (${load.rps} req/s, p99 ${load.p99} ms)`);
    console.log(`\nCPU used during the ${loadSeconds.toFixed(1)} s load phase, by process:`);
    for (const [pid, after] of cpuAfter) {
      const used = after.seconds - (cpuBefore.get(pid)?.seconds ?? 0);
      if (used >= 0.1) console.log(`${used.toFixed(2).padStart(7)} s  ${`${pid} ${after.command}`.slice(0, 110)}`);
    }
    report(profile, top);
    if (recorder) reportTracer(recorder, top);
  } finally {
    await server.stop();
    removeState(stateDir);
  }
}

await main();
