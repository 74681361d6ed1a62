import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app";
import { fixedClock } from "../../src/lib/clock";
import { call, expectProblem, tokenFor } from "../helpers/api";
import { one } from "../helpers/db";
import { makeProduct, makeUser } from "../helpers/factories";
import { d1Down, inject } from "../helpers/faults";
import { IDEMPOTENCY_LOCK_MS } from "../../src/lib/idempotency";

// D1 unreachable: every answer is a 503 problem with Retry-After (never a 500), and a write whose reply was
// lost is applied once however the client retries.

const ledger = (userId: number) =>
  one<{ n: number; balance: number }>(
    "SELECT (SELECT count(*) FROM wallet_transactions WHERE user_id = ?1) AS n, (SELECT balance FROM users WHERE id = ?1) AS balance",
    userId,
  );

/** Sends `request` while the fault `restore` undoes is injected; undoes it whatever happens. */
async function underFault<T>(restore: () => void, request: () => Promise<T>): Promise<T> {
  try {
    return await request();
  } finally {
    restore();
  }
}

function expectUnavailable(res: { status: number; headers: Headers; body: any; text: string }) {
  expectProblem(res, 503, "SERVICE_UNAVAILABLE");
  expect(res.headers.get("retry-after")).toBe("1");
}

describe("D1 unreachable", () => {
  it("a read, a balance and an idempotent claim answer 503 with Retry-After, and nothing changes", async () => {
    const user = await makeUser();
    const product = await makeProduct({ price: 100, stock: 5 });
    const token = await tokenFor(user.id);
    const restore = [
      inject(env.DB, "prepare", () => () => {
        throw d1Down();
      }),
      inject(env.DB, "batch", () => async () => {
        throw d1Down();
      }),
    ];
    try {
      expectUnavailable(await call("GET", `/api/products/${product.id}`));
      expectUnavailable(await call("GET", `/api/balance/${user.id}`, { token }));
      expectUnavailable(await call("GET", "/api/users/balance/history", { token }));
      expectUnavailable(
        await call("POST", "/api/balance/charge", { token, body: { amount: 500 }, headers: { "Idempotency-Key": "outage-1" } }),
      );
      expectUnavailable(await call("POST", "/api/balance/charge", { token, body: { amount: 500 } }));
    } finally {
      restore.forEach((r) => r());
    }
    expect(await ledger(user.id)).toEqual({ n: 0, balance: 0 });
    // The key was never claimed: the same request now simply runs.
    const again = await call("POST", "/api/balance/charge", { token, body: { amount: 500 }, headers: { "Idempotency-Key": "outage-1" } });
    expect(again.status).toBe(200);
    expect(await ledger(user.id)).toEqual({ n: 1, balance: 500 });
  });

  it("a keyed charge whose reply is lost after it committed answers 503, and its retry replays it", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const clock = fixedClock("2026-12-01T10:00:00.000Z");
    const app = createApp({ clock });
    const charge = () =>
      call("POST", "/api/balance/charge", { app, token, body: { amount: 700 }, headers: { "Idempotency-Key": "lost-reply" } });
    // The charge's batch commits, then its reply is lost.
    const first = await underFault(
      inject(env.DB, "batch", (original) => async (statements) => {
        await original(statements);
        throw d1Down();
      }),
      charge,
    );
    expectUnavailable(first);
    expect(await ledger(user.id)).toEqual({ n: 1, balance: 700 });
    // The response was stored in the charge's own batch: the retry replays it, and charges nothing more.
    const retry = await charge();
    expect(retry.status).toBe(200);
    expect(retry.headers.get("idempotent-replayed")).toBe("true");
    expect(retry.body).toMatchObject({ userId: user.id, balance: 700, transaction: { type: "CHARGE", amount: 700 } });
    expect(await ledger(user.id)).toEqual({ n: 1, balance: 700 });
  });

  it("a keyed charge whose reply is lost while its batch still runs is applied once: the late commit stores the reply", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const charge = () => call("POST", "/api/balance/charge", { token, body: { amount: 300 }, headers: { "Idempotency-Key": "late-commit" } });
    // The batch reaches D1 only after the Worker heard "connection lost" and answered: the test runs it then.
    let lost: { run: () => Promise<unknown> } | null = null;
    const first = await underFault(
      inject(env.DB, "batch", (original) => async (statements) => {
        lost = { run: () => original(statements) };
        throw d1Down();
      }),
      charge,
    );
    expectUnavailable(first);
    expect(lost).not.toBeNull();
    await lost!.run();
    // The claim was kept, so the late batch completed it: the retry replays that charge.
    const retry = await charge();
    expect(retry.status).toBe(200);
    expect(retry.headers.get("idempotent-replayed")).toBe("true");
    expect(await ledger(user.id)).toEqual({ n: 1, balance: 300 });
  });

  it("a keyed charge whose batch failed without committing keeps its claim: 409 within the lock, charged once after it", async () => {
    const user = await makeUser();
    const token = await tokenFor(user.id);
    const clock = fixedClock("2026-12-01T11:00:00.000Z");
    const app = createApp({ clock });
    const charge = () =>
      call("POST", "/api/balance/charge", { app, token, body: { amount: 400 }, headers: { "Idempotency-Key": "never-committed" } });
    const first = await underFault(
      inject(env.DB, "batch", () => async () => {
        throw d1Down();
      }),
      charge,
    );
    expectUnavailable(first);
    expect(await ledger(user.id)).toEqual({ n: 0, balance: 0 });
    expectProblem(await charge(), 409, "IDEMPOTENCY_IN_PROGRESS");
    clock.advance(IDEMPOTENCY_LOCK_MS + 1_000);
    const retry = await charge();
    expect(retry.status).toBe(200);
    expect(await ledger(user.id)).toEqual({ n: 1, balance: 400 });
    expect((await charge()).headers.get("idempotent-replayed")).toBe("true");
    expect(await ledger(user.id)).toEqual({ n: 1, balance: 400 });
  });
});
