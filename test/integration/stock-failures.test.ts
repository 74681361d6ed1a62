import { abortAllDurableObjects, evictDurableObject, runDurableObjectAlarm, runInDurableObject } from "cloudflare:test";
import { env, exports } from "cloudflare:workers";
import { describe, expect, it, vi } from "vitest";
import { ADMIN_WRITE_SETTLED_MS } from "../../src/inventory/product-stock";
import { adminToken, call, expectProblem, tokenFor } from "../helpers/api";
import { all, fund, one, walletInvariant } from "../helpers/db";
import { makeCoupon, makeProduct, makeUser } from "../helpers/factories";
import { d1Down, gate, inject } from "../helpers/faults";

// The failure paths of the stock objects, each with its fault injected here and the invariant then
// checked in D1 and in the object.

const stockObject = (productId: number) => env.PRODUCT_STOCK.get(env.PRODUCT_STOCK.idFromName(String(productId)));

async function buyer(balance = 100_000) {
  const user = await makeUser();
  await fund(user.id, balance);
  return { id: user.id, token: await tokenFor(user.id) };
}

const orderOne = (token: string, productId: number, init: RequestInit = {}) =>
  exports.default.fetch(
    new Request("http://shop.test/api/orders", {
      method: "POST",
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: JSON.stringify({ items: [{ productId, quantity: 1 }] }),
      ...init,
    }),
  );

async function soldUnits(productId: number) {
  return one<{ stock: number; units: number }>(
    `SELECT stock, (SELECT coalesce(sum(quantity), 0) FROM order_items WHERE product_id = p.id) AS units
     FROM products p WHERE id = ?`,
    productId,
  );
}

describe("a client that hangs up mid-order", () => {
  it("does not strand its reservation: the order runs to its end and the rest sells out at once", async () => {
    const product = await makeProduct({ price: 100, stock: 3 });
    const [quitter, ...others] = await Promise.all([buyer(), buyer(), buyer()]);
    const stub = stockObject(product.id);
    await stub.snapshot(product.id);

    // D1 stalls: every batch waits until the test opens the gate.
    const stall = gate();
    const restore = inject(env.DB, "batch", (batch) => async (statements) => {
      await stall.opened;
      return batch(statements);
    });
    const hangUp = new AbortController();
    const abandoned = orderOne(quitter!.token, product.id, { signal: hangUp.signal }).catch((error: unknown) => error);
    // The reservation is taken (the object needs no D1 for it); the order then waits for D1.
    await expect.poll(() => stub.snapshot(product.id), { interval: 5 }).toMatchObject({ reserved: 1 });
    hangUp.abort();
    expect(await abandoned).toBeInstanceOf(Error);
    restore();
    stall.open();

    const startedAt = Date.now();
    const results = await Promise.all(others.map((b) => call("POST", "/api/orders", { token: b.token, body: { items: [{ productId: product.id, quantity: 1 }] } })));
    expect(results.map((r) => r.status)).toEqual([200, 200]);
    await expect.poll(() => soldUnits(product.id), { timeout: 1_000 }).toEqual({ stock: 0, units: 3 });
    expect(Date.now() - startedAt).toBeLessThan(1_000);
    await expect.poll(() => stub.snapshot(product.id)).toEqual({ stock: 0, reserved: 0, available: 0 });
    expect(await all("SELECT user_id FROM orders WHERE user_id = ?", quitter!.id)).toHaveLength(1);
  });
});

const alarmOf = (productId: number) => runInDurableObject(stockObject(productId), (_instance, state) => state.storage.getAlarm());
/** The object's records of admin writes not yet known to have landed or failed. */
const adminWrites = (productId: number) =>
  runInDurableObject(stockObject(productId), (_instance, state) => state.storage.sql.exec("SELECT * FROM admin_writes").toArray());
const expireReservations = (productId: number) =>
  runInDurableObject(stockObject(productId), (_instance, state) => {
    state.storage.sql.exec("UPDATE reservations SET expires_at = 0");
  });

async function sellOneEach(productId: number, count: number) {
  const crowd = await Promise.all(Array.from({ length: count }, () => buyer()));
  return Promise.all(crowd.map((b) => call("POST", "/api/orders", { token: b.token, body: { items: [{ productId, quantity: 1 }] } })));
}

/**
 * Routes the stock object's admin write (`adjust`'s UPDATE of the product) through `write`, which runs it
 * (`run`) when it chooses and may then fail: its D1 reply lost, say.
 */
const interceptAdminWrite = (write: (run: () => Promise<unknown>, sql: string, values: unknown[]) => Promise<unknown>) =>
  inject(env.DB, "prepare", (prepare) =>
    ((sql: string) => {
      const statement = prepare(sql);
      if (!sql.includes("UPDATE products SET stock = stock + ?1")) return statement;
      return { bind: (...values: unknown[]) => ({ first: () => write(() => statement.bind(...values).first(), sql, values) }) };
    }) as typeof prepare,
  );

/** Runs a statement the object's admin write would have run, from the test (that write landing late). */
const runHere = (sql: string, values: unknown[]) =>
  env.DB.prepare(sql)
    .bind(...values)
    .run();

/**
 * The object's admin write held until `release()`; `held()` once it is waiting. `landHere()` runs the same
 * statement from the test instead (the write of an object whose life has ended, landing late).
 */
function stalledAdminWrite() {
  let held: { sql: string; values: unknown[] } | null = null;
  const write = gate();
  const restore = interceptAdminWrite(async (run, sql, values) => {
    held = { sql, values };
    await write.opened;
    return run();
  });
  const landHere = () => runHere(held!.sql, held!.values);
  return { held: () => held !== null, release: write.open, landHere, restore };
}

/** A batch that is the stock object's read of D1 (its snapshot of the product and its open entries). */
const readsSnapshot = (statements: D1PreparedStatement[]) =>
  ((statements[0] as unknown as { statement?: string }).statement ?? "").startsWith("SELECT stock, max_per_user, admin_write_id FROM products");

/** Fails every D1 batch while `isDown()` (the object's reads of D1 are batches; its admin write is not). */
const batchesFailWhile = (isDown: () => boolean) =>
  inject(env.DB, "batch", (batch) =>
    (async (statements: D1PreparedStatement[]) => {
      if (isDown()) throw d1Down();
      return batch(statements);
    }) as typeof batch,
  );

/**
 * The error of a reservation refused by a failing D1, as text; caught here: handed to expect().rejects, an
 * RPC promise's rejection is also reported unhandled, which fails the run.
 */
const reservationError = (productId: number, key: string) =>
  stockObject(productId)
    .reserve(productId, key, 1, 1)
    .then(
      () => "reserved",
      (error: unknown) => String(error),
    );

describe("the settlement alarm", () => {
  it("outlasts D1 failing for longer than the runtime's alarm retries, then settles; the stock sells out exactly", async () => {
    const product = await makeProduct({ price: 100, stock: 3 });
    const stub = stockObject(product.id);
    // A Worker reserved 2 units and was never heard from again.
    expect(await stub.reserve(product.id, "vanished-order", 2, 1)).toMatchObject({ ok: true, available: 1 });
    await expireReservations(product.id);

    const restore = inject(env.DB, "prepare", () => () => {
      throw d1Down();
    });
    try {
      // Workers retry a throwing alarm about six times; this one must keep itself alive past that.
      for (let attempt = 0; attempt < 8; attempt++) {
        await runDurableObjectAlarm(stub);
        expect(await alarmOf(product.id)).not.toBeNull();
      }
    } finally {
      restore();
    }
    // Nothing was settled while D1 was down, and nothing was lost either.
    expect(await stub.snapshot(product.id)).toEqual({ stock: 3, reserved: 2, available: 1 });

    expect(await runDurableObjectAlarm(stub)).toBe(true);
    expect(await stub.snapshot(product.id)).toEqual({ stock: 3, reserved: 0, available: 3 });
    expect((await sellOneEach(product.id, 4)).map((r) => r.status).sort()).toEqual([200, 200, 200, 400]);
    expect(await soldUnits(product.id)).toEqual({ stock: 0, units: 3 });
    await expect.poll(() => stub.snapshot(product.id)).toEqual({ stock: 0, reserved: 0, available: 0 });
  });

  it("is set again on a new life that finds reservations left", async () => {
    const product = await makeProduct({ stock: 5 });
    const stub = stockObject(product.id);
    await stub.reserve(product.id, "left-behind", 1, 1);
    await runInDurableObject(stub, (_instance, state) => state.storage.deleteAlarm());
    await evictDurableObject(stub);

    expect(await stub.snapshot(product.id)).toEqual({ stock: 5, reserved: 1, available: 4 });
    expect(await alarmOf(product.id)).not.toBeNull();
  });

  it("is never trusted unset: a refused setAlarm refuses the reservation (503) and holds nothing", async () => {
    const product = await makeProduct({ price: 100, stock: 2 });
    const stub = stockObject(product.id);
    await stub.snapshot(product.id);
    const [first] = await Promise.all([buyer()]);
    await runInDurableObject(stub, (_instance, state) => {
      inject(state.storage, "setAlarm", () => () => Promise.reject(new Error("storage refused the alarm (injected)")));
    });
    const refused = await call("POST", "/api/orders", { token: first!.token, body: { items: [{ productId: product.id, quantity: 1 }] } });
    expectProblem(refused, 503, "SERVICE_UNAVAILABLE");
    expect(refused.headers.get("Retry-After")).toBe("1");
    expect(await stub.snapshot(product.id)).toEqual({ stock: 2, reserved: 0, available: 2 });
    expect(await soldUnits(product.id)).toEqual({ stock: 2, units: 0 });

    await runInDurableObject(stub, (_instance, state) => {
      delete (state.storage as unknown as Record<string, unknown>).setAlarm;
    });
    expect((await sellOneEach(product.id, 2)).map((r) => r.status)).toEqual([200, 200]);
    await expect.poll(() => stub.snapshot(product.id)).toEqual({ stock: 0, reserved: 0, available: 0 });
  });
});

describe("the object never drifts from D1", () => {
  it("an order key reserved again after its order committed (an idempotent takeover) is subtracted once", async () => {
    const product = await makeProduct({ price: 100, stock: 5 });
    const stub = stockObject(product.id);
    const winner = await buyer();
    // Run 1 of a keyed order commits; run 2 (which took the claim over and found no order yet) reserves again.
    const placed = await call("POST", "/api/orders", {
      token: winner.token,
      headers: { "Idempotency-Key": "takeover" },
      body: { items: [{ productId: product.id, quantity: 1 }] },
    });
    expect(placed.status).toBe(200);
    const { order_key } = await one<{ order_key: string }>("SELECT order_key FROM orders WHERE id = ?", placed.body.id);
    await expect.poll(() => stub.snapshot(product.id)).toEqual({ stock: 4, reserved: 0, available: 4 });

    await stub.reserve(product.id, order_key, 1, 1);
    // Run 2's batch meets the order key, and it confirms; or it dies and the alarm settles the key.
    await stub.commit(product.id, order_key);
    await stub.reserve(product.id, order_key, 1, 1);
    await expireReservations(product.id);
    await runDurableObjectAlarm(stub);

    expect(await stub.snapshot(product.id)).toEqual({ stock: 4, reserved: 0, available: 4 });
    expect(await soldUnits(product.id)).toEqual({ stock: 4, units: 1 });
    expect((await sellOneEach(product.id, 5)).filter((r) => r.status === 200)).toHaveLength(4);
    expect(await soldUnits(product.id)).toEqual({ stock: 0, units: 5 });
  });

  it("a stock CHECK refusal re-syncs the object with D1", async () => {
    const product = await makeProduct({ price: 100, stock: 3 });
    const stub = stockObject(product.id);
    await stub.snapshot(product.id);
    // Behind the object's back, D1 loses two units: the object now offers stock D1 does not have.
    await env.DB.prepare("UPDATE products SET stock = 1 WHERE id = ?").bind(product.id).run();

    const results = await sellOneEach(product.id, 3);
    expect(results.filter((r) => r.status === 200)).toHaveLength(1);
    expect(results.filter((r) => r.body?.code === "OUT_OF_STOCK")).toHaveLength(2);
    expect(await soldUnits(product.id)).toEqual({ stock: 0, units: 1 });
    await expect.poll(() => stub.snapshot(product.id)).toEqual({ stock: 0, reserved: 0, available: 0 });
  });
});

describe("an admin stock change whose D1 reply is lost", () => {
  // D1 commits the change, then the reply is lost: the object cannot tell, so it takes D1's numbers again
  // rather than undo the change in its own (which kept a lost +3 unsellable and a lost -2 on offer).
  it.each([
    { delta: 3, after: 8 },
    { delta: -2, after: 3 },
  ])("stockDelta $delta: 503 saying it may have been applied, and the object agrees with D1 after", async ({ delta, after }) => {
    const product = await makeProduct({ price: 100, stock: 5 });
    const stub = stockObject(product.id);
    await stub.snapshot(product.id);
    const restore = interceptAdminWrite(async (run) => {
      await run();
      throw d1Down();
    });
    let res;
    try {
      res = await call("PATCH", `/api/admin/products/${product.id}`, { token: await adminToken(), body: { stockDelta: delta } });
    } finally {
      restore();
    }
    expectProblem(res, 503, "SERVICE_UNAVAILABLE");
    expect(res.headers.get("Retry-After")).toBe("1");
    expect(res.body.detail).toMatch(/may or may not have been applied/);

    expect(await soldUnits(product.id)).toEqual({ stock: after, units: 0 });
    expect(await stub.snapshot(product.id)).toEqual({ stock: after, reserved: 0, available: after });
    const sold = await sellOneEach(product.id, after + 1);
    expect(sold.filter((r) => r.status === 200)).toHaveLength(after);
    expect(await soldUnits(product.id)).toEqual({ stock: 0, units: after });
  });
});

describe("an admin stock change whose D1 reply is lost while D1 then stays down", () => {
  it("the object keeps settling what it holds, decides nothing until it has read D1 again, then agrees with D1", async () => {
    const product = await makeProduct({ price: 100, stock: 5 });
    const stub = stockObject(product.id);
    expect(await stub.reserve(product.id, "held-through-outage", 1, 1)).toMatchObject({ ok: true });
    // The change commits and its reply is lost; then D1 goes down, so the object's re-read fails too.
    let down = false;
    const restore = [
      interceptAdminWrite(async (run) => {
        await run();
        down = true;
        throw d1Down();
      }),
      batchesFailWhile(() => down),
    ];
    try {
      const res = await call("PATCH", `/api/admin/products/${product.id}`, { token: await adminToken(), body: { stockDelta: 3 } });
      expectProblem(res, 503, "SERVICE_UNAVAILABLE");
      // Still down: the failed order's reservation is given back at once (it needs no D1)...
      await stub.release(product.id, "held-through-outage");
      expect(await runInDurableObject(stub, (_instance, state) => state.storage.sql.exec("SELECT order_key FROM reservations").toArray())).toEqual([]);
      // ...but no new reservation is decided on numbers D1 may have moved.
      expect(await reservationError(product.id, "during-outage")).toMatch(/Network connection lost/);
    } finally {
      restore.forEach((r) => r());
    }
    // D1 is back: the next decision reads it first.
    expect(await stub.reserve(product.id, "after-outage", 1, 1)).toMatchObject({ ok: true, available: 7 });
    expect(await stub.snapshot(product.id)).toEqual({ stock: 8, reserved: 1, available: 7 });
    expect(await soldUnits(product.id)).toEqual({ stock: 8, units: 0 });
  });
});

describe("an admin decrease while the object re-reads D1", () => {
  it("a re-read during the write counts the decrease taken; the change, committed, is answered applied even if the last re-read fails", async () => {
    const product = await makeProduct({ price: 100, stock: 10 });
    const stub = stockObject(product.id);
    await stub.snapshot(product.id);
    let down = false;
    const write = stalledAdminWrite();
    const restore = [write.restore, batchesFailWhile(() => down)];
    try {
      const patched = call("PATCH", `/api/admin/products/${product.id}`, { token: await adminToken(), body: { stockDelta: -5 } });
      await expect.poll(write.held, { interval: 5 }).toBe(true);
      // A re-read (a stock CHECK elsewhere, say) reads D1 before the write commits: 10 there, 5 of them taken.
      await stub.resync(product.id);
      // Before: 10 on offer again while D1 was about to have 5.
      expect(await stub.snapshot(product.id)).toEqual({ stock: 5, reserved: 0, available: 5 });
      // The write commits; the re-read it then owes (one ran during it) fails: D1 is down.
      down = true;
      write.release();
      const res = await patched;
      // Before: 503 "may or may not have been applied" for a change D1 has.
      expect(res.status).toBe(200);
      expect(res.body).toMatchObject({ stock: 5 });
      expect(await reservationError(product.id, "during-outage")).toMatch(/Network connection lost/);
    } finally {
      restore.forEach((r) => r());
      write.release();
    }
    expect(await stub.reserve(product.id, "after-outage", 1, 1)).toMatchObject({ ok: true, available: 4 });
    expect(await soldUnits(product.id)).toEqual({ stock: 5, units: 0 });
  });
});

describe("a re-read whose answer arrives after an admin change it read before", () => {
  // The change commits and answers between the re-read's D1 read (before the change) and its reply; an order
  // waits on that re-read. Before: the re-read put back the old numbers (the change no longer in flight).
  it.each([
    { change: { stockDelta: -5 }, quantity: 8, refused: "OUT_OF_STOCK", after: { stock: 5, reserved: 0, available: 5 } },
    { change: { maxPerUser: 2 }, quantity: 3, refused: "PURCHASE_LIMIT_EXCEEDED", after: { stock: 10, reserved: 0, available: 10 } },
  ])("$change: counted as made, so the waiting order of $quantity is refused $refused", async ({ change, quantity, refused, after }) => {
    const product = await makeProduct({ price: 100, stock: 10 });
    const stub = stockObject(product.id);
    await stub.snapshot(product.id);
    let readDone = false;
    let holdRead = true;
    const update = stalledAdminWrite();
    const readReply = gate();
    const restore = [
      update.restore,
      // The re-read runs in D1 at once (before the change) but its reply is held.
      inject(env.DB, "batch", (batch) =>
        (async (statements: D1PreparedStatement[]) => {
          if (!holdRead || !readsSnapshot(statements)) return batch(statements);
          holdRead = false;
          const result = await batch(statements);
          readDone = true;
          await readReply.opened;
          return result;
        }) as typeof batch,
      ),
    ];
    let waiting;
    try {
      const patched = call("PATCH", `/api/admin/products/${product.id}`, { token: await adminToken(), body: change });
      await expect.poll(update.held, { interval: 5 }).toBe(true);
      const resynced = stub.resync(product.id);
      await expect.poll(() => readDone, { interval: 5 }).toBe(true);
      waiting = stub.reserve(product.id, "waits-on-the-re-read", quantity, 1);
      update.release();
      const inFlight = () =>
        runInDurableObject(stub, (instance) => {
          const object = instance as unknown as { decreasesInFlight: number; limitsInFlight: number[] };
          return object.decreasesInFlight + object.limitsInFlight.length;
        });
      await expect.poll(inFlight, { interval: 5 }).toBe(0);
      readReply.open();
      await resynced;
      expect((await patched).status).toBe(200);
    } finally {
      restore.forEach((r) => r());
      update.release();
      readReply.open();
    }
    expect(await waiting).toMatchObject({ ok: false, reason: refused });
    expect(await stub.snapshot(product.id)).toEqual(after);
  });
});

describe("an admin decrease taken while a re-read is already reading D1", () => {
  it("is counted taken by that re-read too, though it was not in flight when the read began", async () => {
    const product = await makeProduct({ price: 100, stock: 10 });
    const stub = stockObject(product.id);
    await stub.snapshot(product.id);
    let reads = 0;
    const firstRead = gate();
    const write = stalledAdminWrite();
    const restore = [
      write.restore,
      // The first re-read is held before it reaches D1; the ones after it run at once.
      inject(env.DB, "batch", (batch) =>
        (async (statements: D1PreparedStatement[]) => {
          if (readsSnapshot(statements) && ++reads === 1) await firstRead.opened;
          return batch(statements);
        }) as typeof batch,
      ),
    ];
    let patched;
    try {
      const first = stub.resync(product.id);
      await expect.poll(() => reads, { interval: 5 }).toBe(1);
      // Queued behind it: a second re-read (a stock CHECK elsewhere, say) and the admin decrease. When the first
      // ends, the second starts reading D1 (10, the decrease not yet written), then the decrease is taken.
      const second = stub.resync(product.id);
      patched = call("PATCH", `/api/admin/products/${product.id}`, { token: await adminToken(), body: { stockDelta: -5 } });
      firstRead.open();
      await Promise.all([first, second]);
      await expect.poll(write.held, { interval: 5 }).toBe(true);
      // Before: the second re-read set 10, as the decrease was not in flight when it began.
      expect(await stub.snapshot(product.id)).toEqual({ stock: 5, reserved: 0, available: 5 });
      write.release();
      expect((await patched).status).toBe(200);
    } finally {
      restore.forEach((r) => r());
      firstRead.open();
      write.release();
    }
    expect(await stub.snapshot(product.id)).toEqual({ stock: 5, reserved: 0, available: 5 });
    expect(await soldUnits(product.id)).toEqual({ stock: 5, units: 0 });
  });
});

describe("an admin change whose object's life ends mid-write", () => {
  /**
   * An admin PATCH of `body` whose write is held while the object's life ends; the held write then lands
   * (run from the test, as the dead life's write arriving late) before or after the next life reads D1.
   */
  async function diesMidWrite(stock: number, body: Record<string, unknown>, lands: "before the next read" | "after the next read") {
    const product = await makeProduct({ price: 100, stock });
    await stockObject(product.id).snapshot(product.id);
    const write = stalledAdminWrite();
    const patched = call("PATCH", `/api/admin/products/${product.id}`, { token: await adminToken(), body });
    await expect.poll(write.held, { interval: 5 }).toBe(true);
    // The life ends (a deploy, a crash): its call fails, its write is left in flight.
    await abortAllDurableObjects();
    write.restore();
    expectProblem(await patched, 503, "SERVICE_UNAVAILABLE");
    // A stub made before the abort stays broken: the next life through a new one.
    const stub = stockObject(product.id);
    if (lands === "before the next read") await write.landHere();
    const before = await stub.snapshot(product.id);
    if (lands === "after the next read") await write.landHere();
    return { product, stub, before };
  }

  /** Runs `work` with the clock past the time the dead life's write could still land. */
  async function afterEarlierWritesSettle<T>(work: () => Promise<T>): Promise<T> {
    vi.useFakeTimers({ toFake: ["Date"], now: Date.now() + ADMIN_WRITE_SETTLED_MS + 1_000 });
    try {
      return await work();
    } finally {
      vi.useRealTimers();
    }
  }

  it("a decrease landing after the next life's read is taken there until it could no longer land, then D1 is read again", async () => {
    const { product, stub, before } = await diesMidWrite(10, { stockDelta: -8 }, "after the next read");
    // Before: 10 on offer while D1 was about to have 2.
    expect(before).toEqual({ stock: 2, reserved: 0, available: 2 });
    expect((await sellOneEach(product.id, 2)).map((r) => r.status)).toEqual([200, 200]);
    // A unit D1 gains behind the object's back is sold only if it reads D1 again once the write has settled.
    await env.DB.prepare("UPDATE products SET stock = stock + 1 WHERE id = ?").bind(product.id).run();
    const sold = await afterEarlierWritesSettle(async () => (await sellOneEach(product.id, 1))[0]!.status);
    expect(sold).toBe(200);
    expect(await soldUnits(product.id)).toEqual({ stock: 0, units: 3 });
    expect(await stub.snapshot(product.id)).toEqual({ stock: 0, reserved: 0, available: 0 });
    expect(await adminWrites(product.id)).toEqual([]);
  });

  it("a decrease that landed before the next life's read is counted once: D1 shows its id", async () => {
    const { product, stub, before } = await diesMidWrite(10, { stockDelta: -8 }, "before the next read");
    // Without the id the next life could not tell, and would take it twice: nothing on offer for 120 s.
    expect(before).toEqual({ stock: 2, reserved: 0, available: 2 });
    expect(await adminWrites(product.id)).toEqual([]);
    expect((await sellOneEach(product.id, 3)).map((r) => r.status).sort()).toEqual([200, 200, 400]);
    expect(await stub.snapshot(product.id)).toEqual({ stock: 0, reserved: 0, available: 0 });
  });

  it("an increase landing after the next life's read is offered once it could no longer land, by the alarm", async () => {
    const { product, stub, before } = await diesMidWrite(2, { stockDelta: 10 }, "after the next read");
    expect(before).toEqual({ stock: 2, reserved: 0, available: 2 });
    // Before: sold out after 2 while D1 had 12, for as long as this life lasted. The alarm re-reads D1
    // even if no order comes.
    expect(await alarmOf(product.id)).not.toBeNull();
    await afterEarlierWritesSettle(() => runDurableObjectAlarm(stockObject(product.id)));
    expect(await stub.snapshot(product.id)).toEqual({ stock: 12, reserved: 0, available: 12 });
    expect(await adminWrites(product.id)).toEqual([]);
    expect((await sellOneEach(product.id, 5)).map((r) => r.status)).toEqual([200, 200, 200, 200, 200]);
    expect(await soldUnits(product.id)).toEqual({ stock: 7, units: 5 });
  });

  it("a tighter purchase limit: the next life keeps it while the write could still land", async () => {
    const { product, stub } = await diesMidWrite(10, { maxPerUser: 1 }, "after the next read");
    const first = await buyer();
    // Before: 2 units were reserved under the old (no) limit, for D1's CHECK to refuse late.
    expect(await stub.reserve(product.id, "over-the-new-limit", 2, first.id)).toMatchObject({
      ok: false,
      reason: "PURCHASE_LIMIT_EXCEEDED",
      maxPerUser: 1,
    });
    const order = (quantity: number) =>
      call("POST", "/api/orders", { token: first.token, body: { items: [{ productId: product.id, quantity }] } });
    expectProblem(await order(2), 400, "PURCHASE_LIMIT_EXCEEDED");
    expect((await order(1)).status).toBe(200);
  });
});

describe("an admin change whose D1 reply is lost while D1 is still running it", () => {
  it("the object counts the decrease taken when its re-read comes first, and D1's id settles it once it lands", async () => {
    const product = await makeProduct({ price: 100, stock: 10 });
    const stub = stockObject(product.id);
    await stub.snapshot(product.id);
    let landHere: (() => Promise<unknown>) | null = null;
    const restore = interceptAdminWrite(async (run, sql, values) => {
      landHere = () => runHere(sql, values);
      throw new Error("D1_ERROR: Network connection lost (injected)");
    });
    try {
      const res = await call("PATCH", `/api/admin/products/${product.id}`, { token: await adminToken(), body: { stockDelta: -8 } });
      expectProblem(res, 503, "SERVICE_UNAVAILABLE");
    } finally {
      restore();
    }
    // The object re-read D1 before the write landed: before, 10 were on offer again.
    expect(await stub.snapshot(product.id)).toEqual({ stock: 2, reserved: 0, available: 2 });
    await landHere!();
    // A re-read once it has landed sees its id: taken once, and the record is gone.
    await stub.resync(product.id);
    expect(await stub.snapshot(product.id)).toEqual({ stock: 2, reserved: 0, available: 2 });
    expect(await adminWrites(product.id)).toEqual([]);
  });

  /** Routes admin writes through: the first `lose` have their reply lost (not run), to be landed by the test. */
  function losingAdminWrites(lose: number) {
    const lost: (() => Promise<unknown>)[] = [];
    const restore = interceptAdminWrite(async (run, sql, values) => {
      if (lost.length >= lose) return run();
      lost.push(() => runHere(sql, values));
      throw new Error("D1_ERROR: Network connection lost (injected)");
    });
    return { lost, restore };
  }

  const patchProduct = async (productId: number, body: Record<string, unknown>) =>
    call("PATCH", `/api/admin/products/${productId}`, { token: await adminToken(), body });

  it("a limit kept for a write still in flight survives a later, looser change that commits first", async () => {
    const product = await makeProduct({ price: 100, stock: 10 });
    const stub = stockObject(product.id);
    const writes = losingAdminWrites(1);
    try {
      expectProblem(await patchProduct(product.id, { maxPerUser: 2 }), 503, "SERVICE_UNAVAILABLE");
      expect((await patchProduct(product.id, { maxPerUser: 10 })).status).toBe(200);
    } finally {
      writes.restore();
    }
    await writes.lost[0]!();
    const user = await buyer();
    // D1 now says 2. Before: the object applied 10 over the 2 it kept, and admitted 3 for D1's CHECK to refuse.
    expect(await stub.reserve(product.id, "three-of-two", 3, user.id)).toMatchObject({ ok: false, reason: "PURCHASE_LIMIT_EXCEEDED", maxPerUser: 2 });
  });

  it("a looser limit written while a tighter one is kept is kept too, once the tighter one has aged out", async () => {
    const product = await makeProduct({ price: 100, stock: 20, maxPerUser: 10 });
    const stub = stockObject(product.id);
    const start = Date.now();
    const at = (ms: number) => vi.useFakeTimers({ toFake: ["Date"], now: start + ms });
    const writes = losingAdminWrites(2);
    try {
      // 2 is lost and never lands; 60 s later 5 is lost too, and lands later.
      expectProblem(await patchProduct(product.id, { maxPerUser: 2 }), 503, "SERVICE_UNAVAILABLE");
      at(60_000);
      expectProblem(await patchProduct(product.id, { maxPerUser: 5 }), 503, "SERVICE_UNAVAILABLE");
      // A re-read (a CHECK refusal, say) once 2 could no longer land but 5 still could: it reads D1's 10.
      at(ADMIN_WRITE_SETTLED_MS + 10_000);
      await stub.resync(product.id);
      const user = await buyer();
      // Before: 5 was recorded as no tighter than the 2 then kept, and the object took D1's 10.
      expect(await stub.reserve(product.id, "six-of-five", 6, user.id)).toMatchObject({ ok: false, maxPerUser: 5 });
    } finally {
      vi.useRealTimers();
      writes.restore();
    }
    await writes.lost[1]!();
  });

  it("a change that committed or was refused leaves no record behind", async () => {
    const product = await makeProduct({ price: 100, stock: 3 });
    const admin = await adminToken();
    expect((await call("PATCH", `/api/admin/products/${product.id}`, { token: admin, body: { stockDelta: 2, maxPerUser: 4 } })).status).toBe(200);
    expect(await adminWrites(product.id)).toEqual([]);
    // D1 refuses the next on its CHECK (its stock went down behind the object's back): nothing was written.
    await env.DB.prepare("UPDATE products SET stock = 1 WHERE id = ?").bind(product.id).run();
    expectProblem(await call("PATCH", `/api/admin/products/${product.id}`, { token: admin, body: { stockDelta: -3 } }), 400, "OUT_OF_STOCK");
    expect(await adminWrites(product.id)).toEqual([]);
    expect(await stockObject(product.id).auditView(product.id)).toEqual({ stock: 1, reserved: 0, openEntries: 0 });
  });
});

describe("an object that fails the call", () => {
  type StockStub = ReturnType<typeof stockObject>;
  type Mode = "overloaded" | "reply lost";
  /**
   * Stock objects whose calls that take stock (`reserve`, and `placeOrder` for a one-product order)
   * throw: "overloaded" before reaching the object, "reply lost" after it did its work.
   */
  function failingObjects(mode: Mode): () => void {
    const fail = () =>
      mode === "overloaded"
        ? Object.assign(new Error("Durable Object is overloaded (injected)"), { overloaded: true })
        : new Error("Network connection lost (injected)");
    return inject(env.PRODUCT_STOCK, "get", (get) => (id) => {
      const stub = get(id) as StockStub;
      const failing =
        <A extends unknown[]>(call: (...args: A) => Promise<unknown>) =>
        async (...args: A) => {
          if (mode === "reply lost") await call(...args);
          throw fail();
        };
      return {
        reserve: failing((...args: Parameters<StockStub["reserve"]>) => stub.reserve(...args)),
        placeOrder: failing((...args: Parameters<StockStub["placeOrder"]>) => stub.placeOrder(...args)),
        check: (...args: Parameters<StockStub["check"]>) => stub.check(...args),
        release: (...args: Parameters<StockStub["release"]>) => stub.release(...args),
        commit: (...args: Parameters<StockStub["commit"]>) => stub.commit(...args),
        settleSoon: (...args: Parameters<StockStub["settleSoon"]>) => stub.settleSoon(...args),
        resync: (...args: Parameters<StockStub["resync"]>) => stub.resync(...args),
      } as unknown as ReturnType<typeof get>;
    });
  }

  async function orderWhileFailing(mode: Mode, items: { productId: number; quantity: number }[]) {
    const user = await buyer();
    const restore = failingObjects(mode);
    try {
      return { user, res: await call("POST", "/api/orders", { token: user.token, body: { items } }) };
    } finally {
      restore();
    }
  }

  it("overloaded: 503 with Retry-After, nothing held, nothing sold (one product and several)", async () => {
    const product = await makeProduct({ price: 100, stock: 2 });
    const other = await makeProduct({ price: 100, stock: 2 });
    for (const items of [[{ productId: product.id, quantity: 2 }], [{ productId: product.id, quantity: 2 }, { productId: other.id, quantity: 1 }]]) {
      const { user, res } = await orderWhileFailing("overloaded", items);
      expectProblem(res, 503, "SERVICE_UNAVAILABLE");
      expect(res.headers.get("Retry-After")).toBe("1");
      expect(await walletInvariantOf(user.id)).toBe(100_000);
    }
    for (const p of [product, other]) {
      expect(await stockObject(p.id).snapshot(p.id)).toEqual({ stock: 2, reserved: 0, available: 2 });
      expect(await soldUnits(p.id)).toEqual({ stock: 2, units: 0 });
    }
  });

  it("a reply lost after reserving (several products): 503, and the reservation is released", async () => {
    const product = await makeProduct({ price: 100, stock: 2 });
    const other = await makeProduct({ price: 100, stock: 2 });
    const { user, res } = await orderWhileFailing("reply lost", [{ productId: product.id, quantity: 2 }, { productId: other.id, quantity: 1 }]);
    expectProblem(res, 503, "SERVICE_UNAVAILABLE");
    expect(res.headers.get("Retry-After")).toBe("1");
    for (const p of [product, other]) {
      expect(await stockObject(p.id).snapshot(p.id)).toEqual({ stock: 2, reserved: 0, available: 2 });
      expect(await soldUnits(p.id)).toEqual({ stock: 2, units: 0 });
    }
    expect(await walletInvariantOf(user.id)).toBe(100_000);
  });

  it("a reply lost after a one-product order was placed: 503 (outcome unknown), placed once, nothing held", async () => {
    const product = await makeProduct({ price: 100, stock: 2 });
    const { user, res } = await orderWhileFailing("reply lost", [{ productId: product.id, quantity: 2 }]);
    expectProblem(res, 503, "SERVICE_UNAVAILABLE");
    expect(res.body.detail).toMatch(/may or may not/);
    expect(await soldUnits(product.id)).toEqual({ stock: 0, units: 2 });
    expect(await stockObject(product.id).snapshot(product.id)).toEqual({ stock: 0, reserved: 0, available: 0 });
    expect(await walletInvariantOf(user.id)).toBe(99_800);
  });

  it("a coupon gate that fails answers 503 with Retry-After", async () => {
    const coupon = await makeCoupon({ totalQuantity: 5 });
    const user = await buyer();
    const restore = inject(env.COUPON_GATE, "getByName", () => () => {
      throw Object.assign(new Error("Durable Object reset because its code was updated (injected)"), { retryable: true });
    });
    let res;
    try {
      res = await call("POST", `/api/coupons/${coupon.id}/issue`, { token: user.token, body: {} });
    } finally {
      restore();
    }
    expectProblem(res, 503, "SERVICE_UNAVAILABLE");
    expect(res.headers.get("Retry-After")).toBe("1");
    expect(await one("SELECT issued_count FROM coupons WHERE id = ?", coupon.id)).toEqual({ issued_count: 0 });
  });
});

async function walletInvariantOf(userId: number): Promise<number> {
  const wallet = await walletInvariant(userId);
  expect(wallet.ledger).toBe(wallet.balance);
  expect(wallet.newest).toBe(wallet.balance);
  return wallet.balance;
}

describe("a re-sync racing a group commit", () => {
  it("a commit landing while the object re-reads D1 is counted once, against the state the re-read leaves", async () => {
    const product = await makeProduct({ price: 100, stock: 5 });
    const stub = stockObject(product.id);
    await stub.snapshot(product.id);
    const user = await buyer();
    const writeHeld = gate();
    const reloadHeld = gate();
    let reloadRead = false;
    // The group's write waits for `writeHeld`; the re-read (3 statements) reads D1 at once, before the
    // write commits, and hands its snapshot back only when `reloadHeld` opens.
    const restore = inject(env.DB, "batch", (batch) =>
      (async (statements: D1PreparedStatement[]) => {
        if (statements.length > 4) await writeHeld.opened;
        const results = await batch(statements);
        if (statements.length === 3) {
          reloadRead = true;
          await reloadHeld.opened;
        }
        return results;
      }) as typeof batch,
    );
    try {
      const ordered = call("POST", "/api/orders", { token: user.token, body: { items: [{ productId: product.id, quantity: 1 }] } });
      await expect.poll(() => stub.snapshot(product.id), { interval: 5 }).toMatchObject({ reserved: 1 });
      const resynced = stub.resync(product.id);
      await expect.poll(() => reloadRead, { interval: 5 }).toBe(true);
      writeHeld.open();
      expect((await ordered).status).toBe(200);
      reloadHeld.open();
      await resynced;
    } finally {
      restore();
      writeHeld.open();
      reloadHeld.open();
    }
    expect(await soldUnits(product.id)).toEqual({ stock: 4, units: 1 });
    await expect.poll(() => stub.snapshot(product.id)).toEqual({ stock: 4, reserved: 0, available: 4 });
  });
});

describe("a later run of the same request adopts the entry an earlier run left open", () => {
  /** When the object's alarm would give up the entry under `key` (ms since the epoch). */
  const expiryOf = (productId: number, key: string) =>
    runInDurableObject(stockObject(productId), (_instance, state) =>
      state.storage.sql.exec<{ expires_at: number }>("SELECT expires_at FROM reservations WHERE order_key = ?", key).one().expires_at,
    );

  it("a retried order's reservation, set to settle soon by the earlier run, is held for the retry's whole write", async () => {
    const product = await makeProduct({ price: 1_000, stock: 5 });
    const user = await makeUser();
    const stub = stockObject(product.id);
    expect(await stub.reserve(product.id, "idem:adopted-sale", 1, user.id)).toMatchObject({ ok: true });
    // The earlier run's write had an unknown outcome: its entry is to be settled against D1 within seconds.
    await stub.settleSoon(product.id, "idem:adopted-sale");
    expect(await expiryOf(product.id, "idem:adopted-sale")).toBeLessThan(Date.now() + 10_000);
    // The retry (a takeover, same order key) finds it and makes it its own: the alarm cannot give it up mid-write.
    expect(await stub.reserve(product.id, "idem:adopted-sale", 1, user.id)).toMatchObject({ ok: true });
    expect(await expiryOf(product.id, "idem:adopted-sale")).toBeGreaterThan(Date.now() + 60_000);
    expect(await stub.snapshot(product.id)).toEqual({ stock: 5, reserved: 1, available: 4 });
  });

  it("an entry adopted while the alarm asks D1 about it stays held: the alarm leaves it to the run that adopted it", async () => {
    const product = await makeProduct({ price: 1_000, stock: 5 });
    const user = await makeUser();
    const stub = stockObject(product.id);
    expect(await stub.reserve(product.id, "idem:adopted-mid-alarm", 1, user.id)).toMatchObject({ ok: true });
    await expireReservations(product.id);
    // The alarm's question to D1 (was this order committed?) stalls; meanwhile the retry adopts the entry.
    let asked = false;
    const answer = gate();
    const restore = inject(env.DB, "prepare", (prepare) =>
      ((sql: string) => {
        const statement = prepare(sql);
        if (!sql.startsWith("SELECT 1 AS hit FROM orders WHERE order_key = ?")) return statement;
        return {
          bind: (...values: unknown[]) => {
            const bound = statement.bind(...values);
            return {
              first: async () => {
                asked = true;
                await answer.opened;
                return bound.first();
              },
            };
          },
        };
      }) as typeof prepare,
    );
    try {
      const alarm = runDurableObjectAlarm(stub);
      // Polled, not awaited on a promise the object resolves: the test would then carry on in the object's context.
      await expect.poll(() => asked, { interval: 5 }).toBe(true);
      expect(await stub.reserve(product.id, "idem:adopted-mid-alarm", 1, user.id)).toMatchObject({ ok: true });
      answer.open();
      expect(await alarm).toBe(true);
    } finally {
      restore();
      answer.open();
    }
    // Before: the alarm gave it up as never committed, and the retry's unit was back on offer mid-write.
    expect(await stub.snapshot(product.id)).toEqual({ stock: 5, reserved: 1, available: 4 });
    expect(await expiryOf(product.id, "idem:adopted-mid-alarm")).toBeGreaterThan(Date.now() + 60_000);
  });

  it("a retried cancellation's announced restock is held the same way", async () => {
    const product = await makeProduct({ price: 1_000, stock: 5 });
    const user = await makeUser();
    const stub = stockObject(product.id);
    await stub.announceRestock(product.id, "restock:adopted", 1, user.id);
    await stub.settleSoon(product.id, "restock:adopted");
    expect(await expiryOf(product.id, "restock:adopted")).toBeLessThan(Date.now() + 10_000);
    await stub.announceRestock(product.id, "restock:adopted", 1, user.id);
    expect(await expiryOf(product.id, "restock:adopted")).toBeGreaterThan(Date.now() + 60_000);
  });
});
