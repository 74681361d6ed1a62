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
