// The CPU time of processes, read from /proc: for bench:profile and bench:cost.
import { readdirSync, readFileSync } from "node:fs";

/**
 * CPU seconds (user + system) of each process, by pid, with its command line; only the processes of the
 * process group `group` when given (a bench server's: `wrangler dev`, its proxy and its workerd).
 */
export function processCpu(group = null) {
  const cpu = new Map();
  for (const pid of readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    try {
      // After the command's closing parenthesis: state, ppid, pgrp, ..., utime (12th), stime (13th).
      const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
      if (group !== null && Number(fields[2]) !== group) continue;
      const command = readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ").trim();
      cpu.set(pid, { command, seconds: (Number(fields[11]) + Number(fields[12])) / 100 });
    } catch {
      // the process ended meanwhile
    }
  }
  return cpu;
}

/** The pids of the workerd processes of `group`. */
export const workerdPids = (group) => [...processCpu(group)].filter(([, p]) => p.command.includes("workerd")).map(([pid]) => pid);

/** CPU seconds of each workerd process of `group`, by pid. */
export const workerdCpu = (group) =>
  new Map([...processCpu(group)].filter(([, p]) => p.command.includes("workerd")).map(([pid, p]) => [pid, p.seconds]));

/**
 * CPU seconds used between two `workerdCpu` readings by the busiest workerd (the one running the Worker, its
 * objects and the simulators, on one thread: what limits throughput) and by the others together.
 */
export function workerdCpuUsed(before, after) {
  const used = [...after].map(([pid, s]) => s - (before.get(pid) ?? 0)).sort((a, b) => b - a);
  return { main: used[0] ?? 0, rest: used.slice(1).reduce((a, b) => a + b, 0) };
}
