// npm run bench [-- --quick] [-- --scenario NAME[,NAME]] [-- --port N] [-- --keep-state] [-- --local-observability] [-- --state-on-disk]
// Starts its own `wrangler dev` on a fresh local state, seeds through the admin API, drives load with
// autocannon, checks invariants through the API and D1, prints the tables and writes bench/results/latest.json.
// Exit code: 1 if an invariant failed (a missed speed target is reported, not fatal), 2 if the bench broke.
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import autocannon from "autocannon";
import { cancelStorm } from "./cancel-storm.mjs";
import { ensureDevVars, readDevVars, tokenFor } from "../scripts/local.mjs";
import { describeAudit, fetchAudit } from "../scripts/audit-client.mjs";
import { invariant, runD1Checks } from "./invariants.mjs";
import { loadMeter } from "./load.mjs";
import { mixed } from "./mixed.mjs";
import { catalogDetail, catalogList, chargeStorm, floor, floorEnd } from "./reads.mjs";
import { evaluateTargets, floorOf, machineInfo, printResults, withRatios, writeResults } from "./report.mjs";
import { CONCURRENCY, scenarioContext } from "./seed.mjs";
import { benchStateDir, queryD1, removeState, startBenchServer, signalRunningServers } from "./server.mjs";
import { couponStorm, orderStorm, orderStormKeyed } from "./storms.mjs";
import { couponStormSharded } from "./coupon-storm-sharded.mjs";
import { SIZES } from "./sizes.mjs";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const RESULTS_FILE = join(ROOT, "bench", "results", "latest.json");
const SCENARIOS = [floor, catalogList, catalogDetail, chargeStorm, couponStorm, couponStormSharded, orderStorm, orderStormKeyed, cancelStorm, mixed, floorEnd];
const FLOORS = ["floor", "floor-end"];


function parseArgs(argv) {
  // wrangler dev's local traces are off unless asked (see startBenchServer); X_LOCAL_OBSERVABILITY=true asks too.
  const options = { quick: false, scenarios: null, port: 8799, keepState: false, stateOnDisk: false, localObservability: process.env.X_LOCAL_OBSERVABILITY === "true" };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => argv[++i] ?? fail(`${arg} needs a value`);
    if (arg === "--quick") options.quick = true;
    else if (arg === "--scenario") options.scenarios = value().split(",");
    else if (arg === "--port") options.port = Number(value());
    else if (arg === "--keep-state") options.keepState = true;
    else if (arg === "--local-observability") options.localObservability = true;
    else if (arg === "--state-on-disk") options.stateOnDisk = true;
    else if (arg === "--help" || arg === "-h") {
      console.log(`usage: npm run bench -- [--quick] [--scenario ${SCENARIOS.map((s) => s.name).join("|")}] [--port N] [--keep-state] [--local-observability] [--state-on-disk]`);
      process.exit(0);
    } else fail(`unknown argument ${arg}`);
  }
  return options;
}

function fail(message) {
  console.error(message);
  process.exit(2);
}

function selectScenarios(names) {
  if (!names) return SCENARIOS;
  const unknown = names.filter((n) => !SCENARIOS.some((s) => s.name === n));
  if (unknown.length) fail(`unknown scenario ${unknown.join(", ")}; one of ${SCENARIOS.map((s) => s.name).join(", ")}`);
  // The floor always runs first and last: every ratio is to the floor of the same run.
  return SCENARIOS.filter((s) => FLOORS.includes(s.name) || names.includes(s.name));
}

function brokenScenario(scenario, error) {
  return {
    name: scenario.name,
    describe: scenario.describe,
    concurrency: CONCURRENCY,
    requests: 0,
    rps: 0,
    p50: 0,
    p95: 0,
    p99: 0,
    statusCounts: {},
    outcomes: {},
    socketErrors: {},
    errors: 0,
    facts: {},
    invariants: [invariant("the scenario ran to the end", false, error.message)],
  };
}

const seconds = (since) => ((Date.now() - since) / 1000).toFixed(1);

async function warmUp(baseUrl) {
  await autocannon({ url: `${baseUrl}/health`, connections: 10, duration: 1 });
  await fetch(`${baseUrl}/api/products`).then((r) => r.arrayBuffer());
}

/**
 * Waits (up to a minute) until the exports a write scenario queued have left: their delivery runs in the
 * same local workerd process, and would otherwise be measured as part of the next scenario.
 */
async function quiesce(api) {
  const deadline = Date.now() + 60_000;
  while (Date.now() < deadline) {
    const { body } = await api.call("GET", "/api/admin/exports?status=pending&limit=1");
    if (body?.items?.length === 0) return;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  console.log("  (exports still pending after 60 s; going on)");
}

async function main() {
  process.chdir(ROOT);
  const options = parseArgs(process.argv.slice(2));
  const selected = selectScenarios(options.scenarios);
  const sizes = options.quick ? SIZES.quick : SIZES.default;
  const started = Date.now();
  const startedAt = new Date(started).toISOString();
  const machine = machineInfo();

  ensureDevVars();
  const { JWT_SECRET: secret } = readDevVars();
  const stateDir = benchStateDir(`bench-${startedAt.replace(/[:.]/g, "-")}`, { onDisk: options.stateOnDisk });

  console.log(`bench ${options.quick ? "--quick" : "(default)"}: ${selected.map((s) => s.name).join(", ")}`);
  console.log(`machine: ${machine.cpu}, node ${machine.node}, ${machine.os}, load ${machine.loadAverageAtStart.join(" ")}`);
  console.log(`wrangler dev's local observability (traces): ${options.localObservability ? "on" : "off"}`);
  const interrupt = () => {
    signalRunningServers();
    if (!options.keepState) removeState(stateDir);
    process.exit(130);
  };
  process.once("SIGINT", interrupt);
  process.once("SIGTERM", interrupt);

  let server;
  try {
    server = await startBenchServer({ port: options.port, stateDir, localObservability: options.localObservability });
  } catch (error) {
    if (!options.keepState) removeState(stateDir);
    throw error;
  }
  console.log(`server: ${server.baseUrl} (state ${stateDir}) up after ${seconds(started)} s`);
  loadMeter.group = server.group;
  loadMeter.cronTicks = server.cronTicks;

  const results = [];
  const d1Checks = [];
  let completed = false;
  let workerReloads = 0;
  try {
    const ctx = await scenarioContext(server, secret, sizes);
    await warmUp(server.baseUrl);

    for (const scenario of selected) {
      const scenarioStarted = Date.now();
      const reloadsBefore = server.reloads();
      try {
        const { load, facts, invariants, d1Checks: checks } = await scenario.run(ctx);
        const total = Number(seconds(scenarioStarted));
        console.log(
          `  ${scenario.name.padEnd(15)} ${String(load.requests).padStart(6)} requests in ${load.durationS} s` +
            ` (${load.rps} req/s, p99 ${load.p99} ms, ${load.cpuUs ?? "?"} µs of main workerd CPU each` +
            `${load.cronTicks ? `, the minute cron ran during it` : ""}); seeding and API checks ${Math.max(0, total - load.durationS).toFixed(1)} s`,
        );
        const reloads = server.reloads() - reloadsBefore;
        if (reloads) console.log(`  WARNING: the Worker was reloaded ${reloads} time(s) during ${scenario.name} (a source file changed)`);
        results.push({ name: scenario.name, describe: scenario.describe, ...load, facts: facts ?? {}, invariants, workerReloads: reloads });
        d1Checks.push(...checks.map((check) => ({ scenario: scenario.name, check })));
        if (scenario.write) await quiesce(ctx.api);
      } catch (error) {
        // One broken scenario is reported as a failed invariant; the others still run.
        console.log(`  ${scenario.name.padEnd(15)} FAILED: ${error.message}`);
        console.error(`--- last lines of the wrangler dev log ---\n${server.logTail()}`);
        results.push(brokenScenario(scenario, error));
      }
    }

    const d1Started = Date.now();
    const verdicts = runD1Checks(
      (sql) => queryD1(stateDir, sql),
      d1Checks.map((c) => c.check),
    );
    verdicts.forEach((invariants, i) => results.find((r) => r.name === d1Checks[i].scenario).invariants.push(...invariants));
    console.log(`  D1 checks: ${d1Checks.length} in ${seconds(d1Started)} s; exports delivered to the stand-in platform: ${server.exportsReceived()}`);
    // The service's own audit, on everything the scenarios left behind.
    const audit = await fetchAudit(server.baseUrl, await tokenFor(secret, "admin"));
    results.at(-1).invariants.push(invariant("audit: GET /api/admin/audit is ok", audit.ok, describeAudit(audit).replaceAll("\n", "; ")));
    completed = true;
  } finally {
    workerReloads = server.reloads();
    if (!completed) console.error(`--- last lines of the wrangler dev log ---\n${server.logTail()}`);
    await server.stop();
    if (!options.keepState) removeState(stateDir);
  }

  const floor = floorOf(results);
  const scenarios = withRatios(results, floor);
  const targets = evaluateTargets(scenarios, floor);
  printResults(scenarios, targets, floor);
  if (options.quick) {
    console.log("  (--quick: a storm of a few hundred requests is mostly ramp-up; the targets are meant for the default sizes)");
  }
  const elapsedS = Number(seconds(started));
  writeResults(RESULTS_FILE, {
    machine,
    startedAt,
    mode: options.quick ? "quick" : "default",
    localObservability: options.localObservability,
    stateDir,
    elapsedS,
    sizes,
    workerReloads,
    floor,
    scenarios: scenarios.map(({ describe, ...s }) => ({ ...s, description: describe })),
    targets,
  });
  const failed = scenarios.flatMap((s) => s.invariants).filter((i) => !i.pass);
  console.log(`\n${failed.length ? `${failed.length} invariant(s) FAILED` : "all invariants PASS"}; ` +
    `${targets.filter((t) => !t.pass).length} of ${targets.length} targets missed; ${elapsedS} s in all; ` +
    `results in ${RESULTS_FILE.slice(ROOT.length + 1)}`);
  process.exitCode = failed.length ? 1 : 0;
}

main().catch((error) => {
  console.error(`bench failed: ${error.stack ?? error}`);
  process.exit(2);
});
