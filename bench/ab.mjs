// npm run bench:ab -- --base REV [--scenario NAME[,NAME]] [--runs N]
// Compares this checkout with an earlier commit on the same machine: runs the bench's scenarios on each,
// alternating (base, this, base, this, ...), each on its own fresh server, and prints every run's req/s and
// ratio to its floor. One run's ratio moves with the machine (the same scenario ran at 122 and 185 req/s back
// to back here); alternating runs of two commits say whether a change helped.
// The base is checked out in a throw-away worktree under .wrangler/, sharing this checkout's node_modules.
import { spawnSync } from "node:child_process";
import { copyFileSync, existsSync, readFileSync, rmSync, symlinkSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");

function parseArgs(argv) {
  const options = { base: null, scenarios: "order-storm", runs: 2 };
  for (let i = 0; i < argv.length; i++) {
    const value = () => argv[++i] ?? fail(`${argv[i - 1]} needs a value`);
    if (argv[i] === "--base") options.base = value();
    else if (argv[i] === "--scenario") options.scenarios = value();
    else if (argv[i] === "--runs") options.runs = Number(value());
    else fail(`unknown argument ${argv[i]}`);
  }
  if (!options.base) fail("usage: npm run bench:ab -- --base REV [--scenario NAME[,NAME]] [--runs N]");
  if (!Number.isInteger(options.runs) || options.runs < 1) fail("--runs must be a positive integer");
  return options;
}

function fail(message) {
  console.error(message);
  process.exit(2);
}

function git(...args) {
  const result = spawnSync("git", args, { cwd: ROOT, encoding: "utf8" });
  if (result.status !== 0) fail(`git ${args.join(" ")} failed:\n${result.stderr}`);
  return result.stdout.trim();
}

/** One bench run in `dir`; the scenarios' req/s, ratio to the floor and p99, from that run's results file. */
function benchOnce(dir, scenarios, extraArgs) {
  const run = spawnSync(process.execPath, ["bench/run.mjs", "--scenario", scenarios, ...extraArgs], {
    cwd: dir,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
    // Both sides alike: wrangler dev's local traces off unless asked (a base from before the bench turned
    // them off leaves them to this variable).
    env: { ...process.env, X_LOCAL_OBSERVABILITY: process.env.X_LOCAL_OBSERVABILITY ?? "false" },
  });
  if (run.status === 2) fail(`the bench broke in ${dir}:\n${run.stdout.slice(-2000)}`);
  const results = JSON.parse(readFileSync(join(dir, "bench", "results", "latest.json"), "utf8"));
  return results.scenarios
    .filter((s) => !s.name.startsWith("floor"))
    .map((s) => ({ name: s.name, rps: s.rps, ratio: s.ratioToFloor, p99: s.p99, passed: s.invariants.every((i) => i.pass) }))
    .concat([{ name: "floor", rps: results.floor?.rps ?? null, ratio: 1, p99: results.floor?.p99 ?? null, passed: true }]);
}

function main() {
  const options = parseArgs(process.argv.slice(2));
  const baseSha = git("rev-parse", "--verify", `${options.base}^{commit}`);
  const headSha = git("rev-parse", "HEAD");
  const dirty = git("status", "--porcelain", "--untracked-files=no") !== "";
  const worktree = join(ROOT, ".wrangler", `ab-${baseSha.slice(0, 12)}`);
  rmSync(worktree, { recursive: true, force: true });
  git("worktree", "prune");
  git("worktree", "add", "--detach", worktree, baseSha);
  try {
    symlinkSync(join(ROOT, "node_modules"), join(worktree, "node_modules"));
    if (existsSync(join(ROOT, ".dev.vars"))) copyFileSync(join(ROOT, ".dev.vars"), join(worktree, ".dev.vars"));
    const docs = spawnSync(process.execPath, ["scripts/docs-assets.mjs"], { cwd: worktree, stdio: "ignore" });
    if (docs.status !== 0) fail("scripts/docs-assets.mjs failed in the base worktree");

    // A base from before the bench kept its state in memory (bench/server.mjs, benchStateDir) runs on disk:
    // then this side does too, so the comparison is of the code, not of the storage.
    const baseInMemory = spawnSync("git", ["grep", "-q", "benchStateDir", baseSha, "--", "bench/server.mjs"], { cwd: ROOT }).status === 0;
    if (!baseInMemory) console.log("the base keeps the bench's state on disk: this side runs with --state-on-disk too");
    const sides = [
      { label: `base ${baseSha.slice(0, 7)}`, dir: worktree, args: [], runs: [] },
      { label: `this ${headSha.slice(0, 7)}${dirty ? "+changes" : ""}`, dir: ROOT, args: baseInMemory ? [] : ["--state-on-disk"], runs: [] },
    ];
    for (let i = 1; i <= options.runs; i++) {
      for (const side of sides) {
        console.log(`run ${i}/${options.runs}: ${side.label} ...`);
        side.runs.push(benchOnce(side.dir, options.scenarios, side.args));
      }
    }

    console.log(`\n${"scenario".padEnd(20)} ${"side".padEnd(22)} req/s (× floor) per run`);
    const names = sides[0].runs[0].map((s) => s.name);
    for (const name of names) {
      for (const side of sides) {
        const cells = side.runs.map((run) => {
          const s = run.find((r) => r.name === name);
          if (!s) return "-";
          return `${s.rps} (${s.ratio})${s.passed ? "" : " INVARIANT FAILED"}`;
        });
        console.log(`${name.padEnd(20)} ${side.label.padEnd(22)} ${cells.join("  ")}`);
      }
    }
    const failed = sides.some((side) => side.runs.some((run) => run.some((s) => !s.passed)));
    process.exitCode = failed ? 1 : 0;
  } finally {
    rmSync(worktree, { recursive: true, force: true });
    git("worktree", "prune");
  }
}

main();
