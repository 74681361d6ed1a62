// Drives one scenario's load with autocannon's programmatic API. Every request is built by the scenario's
// `nextJob()` (so each can carry a different user's token and body) and every answer is classified by
// status and problem `code`, so the contract's expected refusals are told apart from errors.
import autocannon from "autocannon";
import { workerdCpu, workerdCpuUsed } from "./processes.mjs";

const REQUEST_TIMEOUT_S = 30;

/** Hands out each job once, in order; a second use would mean autocannon sent more than `amount`. */
export function oneEach(jobs, onOverflow) {
  let next = 0;
  return () => {
    if (next >= jobs.length) onOverflow();
    return jobs[next++ % jobs.length];
  };
}

function outcomeOf(status, body) {
  if (status < 300) return String(status);
  try {
    return `${status} ${JSON.parse(body).code ?? "?"}`;
  } catch {
    return `${status} (not problem+json)`;
  }
}

function percentile(sorted, p) {
  if (sorted.length === 0) return 0;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank];
}

/** A seeded random number generator (mulberry32): deterministic, so two runs send the same requests in the same order. */
export function seededRandom(seed) {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const round = (n, digits = 1) => Math.round(n * 10 ** digits) / 10 ** digits;

/**
 * Runs `amount` requests (every one answered before it returns) or, without `amount`, for `duration` seconds.
 * `nextJob()` returns `{ method, path, token?, body?, kind?, onAnswer?(status, parsedBody) }`; `kind` splits the
 * latency by answer for blends.
 * `expected` lists the outcomes that are part of the contract ("200", "400 COUPON_SOLD_OUT"); anything else,
 * 5xx and socket errors count as errors.
 */
/**
 * Called around every load phase (after the scenario's seeding, before its checks): `bench/profile.mjs`
 * starts and stops the Worker's profiler here. Nothing is set during a normal bench run.
 */
export const loadHooks = { before: null, after: null };

/**
 * The bench server's process group, when set (bench/run.mjs): every load phase then also reports the CPU
 * the main workerd spent per request (`cpuUs`), far steadier on a shared machine than requests per second
 * (each phase starts once the server is idle, see untilIdle),
 * and, with `cronTicks` (the server's count of minute-cron ticks), how many ticks fell in it (`cronTicks`).
 */
export const loadMeter = { group: null, cronTicks: null };

/**
 * Waits (up to 30 s) until the server's main workerd is idle: under 10% of a core over half a second. What
 * an earlier scenario left running (queue consumers, exports, the objects' alarms) then does not land in the
 * next phase's numbers.
 */
async function untilIdle(group) {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    const before = workerdCpu(group);
    await new Promise((resolve) => setTimeout(resolve, 500));
    if (workerdCpuUsed(before, workerdCpu(group)).main < 0.05) return;
  }
  console.log("  (the server was still busy after 30 s; measuring anyway)");
}

export async function runLoad({ baseUrl, concurrency, amount, duration, nextJob, expected }) {
  await loadHooks.before?.();
  const group = loadMeter.group;
  if (group !== null) await untilIdle(group);
  const cpuBefore = group === null ? null : workerdCpu(group);
  const ticksBefore = loadMeter.cronTicks?.() ?? null;
  try {
    const result = await load({ baseUrl, concurrency, amount, duration, nextJob, expected });
    if (cpuBefore === null || result.requests === 0) return result;
    const { main } = workerdCpuUsed(cpuBefore, workerdCpu(group));
    const cronTicks = ticksBefore === null ? {} : { cronTicks: loadMeter.cronTicks() - ticksBefore };
    return { ...result, cpuUs: Math.round((main * 1e6) / result.requests), ...cronTicks };
  } finally {
    await loadHooks.after?.();
  }
}

async function load({ baseUrl, concurrency, amount, duration, nextJob, expected }) {
  const latencies = [];
  const latenciesByOutcome = {};
  // autocannon calls a request's onResponse and then, synchronously for the same answer, emits "response"
  // with its latency: the outcome is handed from one to the other through this variable.
  let lastOutcome = "?";
  const outcomes = {};
  const statusCounts = {};
  const socketErrors = {};

  const request = {
    setupRequest(req, context) {
      const job = nextJob();
      context.job = job;
      const headers = { accept: "application/json" };
      if (job.token) headers.authorization = `Bearer ${job.token}`;
      if (job.body !== undefined) headers["content-type"] = "application/json";
      Object.assign(headers, job.headers);
      return {
        ...req,
        method: job.method ?? "GET",
        path: job.path,
        headers,
        body: job.body === undefined ? undefined : JSON.stringify(job.body),
      };
    },
    onResponse(status, body, context) {
      const outcome = outcomeOf(status, body);
      lastOutcome = context.job?.kind ? `${context.job.kind} ${outcome}` : outcome;
      outcomes[outcome] = (outcomes[outcome] ?? 0) + 1;
      statusCounts[status] = (statusCounts[status] ?? 0) + 1;
      const job = context.job;
      if (job?.onAnswer) {
        let parsed = null;
        try {
          parsed = JSON.parse(body);
        } catch {
          // classified above; the scenario sees null
        }
        job.onAnswer(status, parsed);
      }
    },
  };

  // autocannon's own duration is rounded up to its 1 s sampling tick; time the run from first send to last answer.
  const startedAt = performance.now();
  const instance = autocannon({
    url: baseUrl,
    connections: concurrency,
    ...(amount ? { amount } : { duration }),
    timeout: REQUEST_TIMEOUT_S,
    requests: [request],
  });
  let lastAnswerAt = startedAt;
  instance.on("response", (_client, _status, _bytes, responseTime) => {
    latencies.push(responseTime);
    (latenciesByOutcome[lastOutcome] ??= []).push(responseTime);
    lastAnswerAt = performance.now();
  });
  instance.on("reqError", (error) => {
    const key = error?.code ?? error?.message ?? "socket error";
    socketErrors[key] = (socketErrors[key] ?? 0) + 1;
  });
  await instance;
  const seconds = (lastAnswerAt - startedAt) / 1000;

  latencies.sort((a, b) => a - b);
  const expectedSet = new Set(expected);
  const unexpected = Object.entries(outcomes).filter(([outcome]) => !expectedSet.has(outcome));
  const errors =
    unexpected.reduce((sum, [, n]) => sum + n, 0) + Object.values(socketErrors).reduce((a, b) => a + b, 0);
  return {
    concurrency,
    requests: latencies.length,
    durationS: round(seconds, 2),
    rps: seconds > 0 ? round(latencies.length / seconds) : 0,
    p50: round(percentile(latencies, 50)),
    p95: round(percentile(latencies, 95)),
    p99: round(percentile(latencies, 99)),
    statusCounts,
    outcomes,
    latencyByOutcome: Object.fromEntries(
      Object.entries(latenciesByOutcome).map(([outcome, values]) => {
        values.sort((a, b) => a - b);
        return [outcome, { p50: round(percentile(values, 50)), p99: round(percentile(values, 99)) }];
      }),
    ),
    socketErrors,
    errors,
  };
}
