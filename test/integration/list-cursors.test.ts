import { describe, expect, it } from "vitest";
import { createApp, type App } from "../../src/app";
import { fixedClock } from "../../src/lib/clock";
import { adminToken, call } from "../helpers/api";

// Two requests create rows concurrently: the slow one read its clock (T1) before the fast one (T2), but
// commits after it, and after a client has read the first page. Lists are ordered by (created_at, id)
// descending, so a row stamped T1 would land behind that client's cursor: neither its next pages nor a
// fresh first page would show it at the top. Each list's rows here are the only ones in this file's D1.

const T2 = "2090-05-05T12:00:00.000Z";
const T1 = "2090-05-05T11:59:00.000Z";

interface Row {
  id: number;
  createdAt: string;
}

const fast = createApp({ clock: fixedClock(T2) });
const slow = createApp({ clock: fixedClock(T1) });

async function page(app: App, path: string, cursor?: string | null) {
  const query = cursor ? `?limit=2&cursor=${cursor}` : "?limit=2";
  const res = await call<{ items: Row[]; nextCursor: string | null }>("GET", `${path}${query}`, {
    app,
    token: await adminToken(),
  });
  expect(res.status).toBe(200);
  return res.body;
}

async function rest(app: App, path: string, cursor: string | null): Promise<number[]> {
  const ids: number[] = [];
  while (cursor) {
    const next = await page(app, path, cursor);
    ids.push(...next.items.map((r) => r.id));
    cursor = next.nextCursor;
  }
  return ids;
}

/** Fast creates three rows, a client reads page 1, then the slow create commits. */
async function raceBehindCursor<T extends Row>(path: string, create: (app: App) => Promise<T>) {
  for (let i = 0; i < 3; i++) await create(fast);
  const first = await page(fast, path);
  const late = await create(slow);
  const fresh = await page(fast, path);
  const afterCursor = await rest(fast, path, first.nextCursor);
  const everything = [...fresh.items.map((r) => r.id), ...(await rest(fast, path, fresh.nextCursor))];
  return { firstIds: first.items.map((r) => r.id), late, freshIds: fresh.items.map((r) => r.id), afterCursor, everything };
}

async function created<T>(path: string, app: App, body: unknown): Promise<T> {
  const res = await call<T>("POST", path, { app, token: await adminToken(), body });
  expect(res.status).toBe(201);
  return res.body;
}

describe("a create whose clock is behind never lands behind a cursor", () => {
  it("products: the late product heads a fresh first page; the cursor neither skips nor repeats", async () => {
    let n = 0;
    const { firstIds, late, freshIds, afterCursor, everything } = await raceBehindCursor(
      "/api/products",
      (app) => created<Row & { updatedAt: string }>("/api/admin/products", app, { name: `cursor ${++n}`, price: 100, stock: 1 }),
    );
    expect(freshIds[0]).toBe(late.id);
    expect(afterCursor).not.toContain(late.id);
    expect([late.id, ...firstIds, ...afterCursor]).toEqual(everything);
    expect(late.createdAt).toBe(T2);
    expect(late.updatedAt).toBe(late.createdAt);
  });

  it("users: the late user heads a fresh first page; the cursor neither skips nor repeats", async () => {
    let n = 0;
    const { firstIds, late, freshIds, afterCursor, everything } = await raceBehindCursor("/api/admin/users", (app) =>
      created<Row>("/api/admin/users", app, { name: `cursor ${++n}` }),
    );
    expect(freshIds[0]).toBe(late.id);
    expect(afterCursor).not.toContain(late.id);
    expect([late.id, ...firstIds, ...afterCursor]).toEqual(everything);
    expect(late.createdAt).toBe(T2);
  });
});
