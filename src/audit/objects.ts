import { forEachBounded, type AuditLimits, type Check } from "./check";

// Compares each row's Durable Object with D1. The two are read one after the other, never in one
// snapshot, so an order or an issue landing in between can make a healthy pair differ for a moment: a
// pair that differs is asked again after each of `confirmDelaysMs`, D1 first, and reported only if it
// still differs every time. Objects that are not live, or busy (entries open, a batch in flight), are
// counted in the check's details rather than compared exactly.

export type Verdict = "agrees" | "disagrees" | "busy";

export interface ObjectAudit<V> {
  /** The object's read-only view of row `id`, or null when it holds no live state for it. */
  ask(id: number): Promise<V | null>;
  judge(view: V, d1: number): Verdict;
  /** D1's current values for `ids` (the confirmation's read). */
  reread(ids: number[]): Promise<Map<number, number>>;
}

export interface Disagreement<V> {
  id: number;
  d1: number;
  view: V;
}

type Outcome<V> = keyof typeof DETAIL | { d1: number; view: V };

/** What the audit made of one row's object, after its confirmations. */
export type ObjectOutcome = Verdict | "idle" | "unreachable";

const DETAIL = { agrees: "objectsAgreed", idle: "objectsIdle", busy: "objectsBusy", unreachable: "objectsUnreachable" } as const;

/**
 * Asks the object of each row, and returns the rows whose object disagrees with D1 on every look. Counts
 * the rest in `check`'s details: objectsAgreed, objectsIdle (not live: it reads D1 before deciding
 * anything), objectsBusy, objectsUnreachable. `outcomes`, when given, gets each row's final outcome.
 */
export async function compareObjects<V>(
  rows: { id: number; d1: number }[],
  audit: ObjectAudit<V>,
  limits: AuditLimits,
  check: Check,
  outcomes?: Map<number, ObjectOutcome>,
): Promise<Disagreement<V>[]> {
  const look = async (id: number, d1: number): Promise<Outcome<V>> => {
    let view: V | null;
    try {
      view = await withTimeout(audit.ask(id), limits.objectTimeoutMs);
    } catch {
      return "unreachable";
    }
    if (view === null) return "idle";
    const verdict = audit.judge(view, d1);
    return verdict === "disagrees" ? { d1, view } : verdict;
  };

  let suspects: Disagreement<V>[] = [];
  const tally = (id: number, outcome: Outcome<V>) => {
    outcomes?.set(id, typeof outcome === "object" ? "disagrees" : outcome);
    if (typeof outcome === "object") suspects.push({ id, ...outcome });
    else check.count(DETAIL[outcome]);
  };

  await forEachBounded(rows, limits.concurrency, async ({ id, d1 }) => tally(id, await look(id, d1)));
  for (const delayMs of limits.confirmDelaysMs) {
    if (suspects.length === 0) break;
    await new Promise((resolve) => setTimeout(resolve, delayMs));
    const again = suspects;
    suspects = [];
    const current = await audit.reread(again.map((s) => s.id));
    await forEachBounded(again, limits.concurrency, async ({ id }) => {
      const d1 = current.get(id);
      // The row is gone: nothing left to disagree with.
      if (d1 === undefined) return tally(id, "idle");
      tally(id, await look(id, d1));
    });
  }
  return suspects;
}

/** `sql` selects `id` and `value` for the ids in its one json_each parameter. */
export async function readValues(db: D1Database, sql: string, ids: number[]): Promise<Map<number, number>> {
  const { results } = await db.prepare(sql).bind(JSON.stringify(ids)).all<{ id: number; value: number }>();
  return new Map(results.map((r) => [r.id, r.value]));
}

export function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
