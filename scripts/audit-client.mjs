// GET /api/admin/audit from Node, for the drill, the bench and operators.
//
//   import { assertAuditClean } from "../scripts/audit-client.mjs";
//   await assertAuditClean(baseUrl, adminToken);   // throws on ok: false, naming each broken check
//
//   node scripts/audit-client.mjs [baseUrl]        // exit 1 on ok: false (admin token from .dev.vars)

import { pathToFileURL } from "node:url";

/** The audit report, or an Error when the server does not answer 200 with one. */
export async function fetchAudit(baseUrl, adminToken, { timeoutMs = 120_000 } = {}) {
  const res = await fetch(new URL("/api/admin/audit", baseUrl), {
    headers: { authorization: `Bearer ${adminToken}` },
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  if (res.status !== 200) throw new Error(`GET /api/admin/audit answered ${res.status}: ${text.slice(0, 300)}`);
  const report = JSON.parse(text);
  if (typeof report.ok !== "boolean" || !Array.isArray(report.checks)) {
    throw new Error(`GET /api/admin/audit answered no audit: ${text.slice(0, 300)}`);
  }
  return report;
}

/** One line per check: name, ok or its violations with up to 3 samples, rows checked and details. */
export function describeAudit(report) {
  return report.checks
    .map((c) => {
      const details = Object.entries(c.details ?? {}).map(([k, v]) => `${k} ${v}`).join(", ");
      const verdict = c.ok ? "ok" : `${c.violations} violation(s), e.g. ${c.samples.slice(0, 3).map((s) => JSON.stringify(s)).join(" ")}`;
      return `${c.name}: ${verdict}; ${c.checked} checked${details ? `; ${details}` : ""}`;
    })
    .join("\n");
}

/** Returns the report when the audit is clean; throws an Error describing the broken checks otherwise. */
export async function assertAuditClean(baseUrl, adminToken, options) {
  const report = await fetchAudit(baseUrl, adminToken, options);
  if (!report.ok) throw new Error(`audit found violations (checked at ${report.checkedAt}):\n${describeAudit(report)}`);
  return report;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const { ensureDevVars, readDevVars, tokenFor } = await import("./local.mjs");
  ensureDevVars();
  const baseUrl = process.argv[2] ?? "http://localhost:8787";
  try {
    const report = await assertAuditClean(baseUrl, await tokenFor(readDevVars().JWT_SECRET, "admin"));
    console.log(`audit clean (checked at ${report.checkedAt}):\n${describeAudit(report)}`);
  } catch (error) {
    console.error(error.message);
    process.exit(1);
  }
}
