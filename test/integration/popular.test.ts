import { env } from "cloudflare:workers";
import { describe, expect, it } from "vitest";
import { createApp } from "../../src/app";
import { fixedClock } from "../../src/lib/clock";
import { call } from "../helpers/api";
import { countingD1 } from "../helpers/counting-d1";
import { makeProduct } from "../helpers/factories";

// Each test pins its own far-future day, so its window holds only its own sales and its KV entry
// (keyed by the window's last date) is its own.

async function recordSale(date: string, productId: number, quantity: number): Promise<void> {
  await env.DB.prepare(
    `INSERT INTO product_sales_daily (stat_date, product_id, quantity) VALUES (?, ?, ?)
     ON CONFLICT (stat_date, product_id) DO UPDATE SET quantity = quantity + excluded.quantity`,
  )
    .bind(date, productId, quantity)
    .run();
}

function popularAt(now: string, headers?: Record<string, string>) {
  return call("GET", "/api/products/popular", { app: createApp({ clock: fixedClock(now) }), headers });
}

const ranked = (body: { items: { rank: number; product: { id: number }; quantitySold: number }[] }) =>
  body.items.map((i) => [i.rank, i.product.id, i.quantitySold]);

describe("GET /api/products/popular", () => {
  it("counts stat dates from today - 3 days through today (UTC): 4 days ago and tomorrow are out", async () => {
    const [fourDaysAgo, threeDaysAgo, today, tomorrow] = [
      await makeProduct(),
      await makeProduct(),
      await makeProduct(),
      await makeProduct(),
    ];
    await recordSale("2031-01-06", fourDaysAgo.id, 100);
    await recordSale("2031-01-07", threeDaysAgo.id, 5);
    await recordSale("2031-01-08", threeDaysAgo.id, 1);
    await recordSale("2031-01-10", today.id, 3);
    await recordSale("2031-01-11", tomorrow.id, 50);

    const res = await popularAt("2031-01-10T23:59:59.999Z");
    expect(res.status).toBe(200);
    expect(res.body).toMatchObject({ from: "2031-01-07", to: "2031-01-10", generatedAt: "2031-01-10T23:59:59.999Z" });
    expect(ranked(res.body)).toEqual([
      [1, threeDaysAgo.id, 6],
      [2, today.id, 3],
    ]);
  });

  it("is public and returns the top 5, ties by product id ascending, with full products", async () => {
    const products = [];
    for (let i = 0; i < 7; i++) products.push(await makeProduct());
    const [a, b, c, d, e, f, g] = products.map((p) => p.id) as [number, number, number, number, number, number, number];
    // Insert in an order unrelated to the ranking, so the order of the result comes from the query.
    await recordSale("2032-06-15", g, 1);
    await recordSale("2032-06-15", f, 3);
    await recordSale("2032-06-14", e, 3);
    await recordSale("2032-06-15", d, 7);
    await recordSale("2032-06-13", c, 7);
    await recordSale("2032-06-15", b, 4);
    await recordSale("2032-06-12", b, 3);
    await recordSale("2032-06-15", a, 10);

    const res = await popularAt("2032-06-15T09:00:00.000Z");
    expect(res.status).toBe(200);
    expect(ranked(res.body)).toEqual([
      [1, a, 10],
      [2, b, 7],
      [3, c, 7],
      [4, d, 7],
      [5, e, 3],
    ]);
    expect(res.body.items[0].product).toEqual(products[0]);
  });

  it("lists fewer items when fewer than 5 products sold", async () => {
    const [p, q] = [await makeProduct(), await makeProduct()];
    await recordSale("2033-03-01", q.id, 2);
    await recordSale("2033-03-01", p.id, 2);
    const res = await popularAt("2033-03-02T00:00:00.000Z");
    expect(ranked(res.body)).toEqual([
      [1, p.id, 2],
      [2, q.id, 2],
    ]);
  });

  it("is an empty list when nothing sold in the window", async () => {
    const res = await popularAt("2034-07-20T12:00:00.000Z");
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ items: [], from: "2034-07-17", to: "2034-07-20", generatedAt: "2034-07-20T12:00:00.000Z" });
  });

  it("is cached in KV for the day (same body), and a new UTC day starts a fresh ranking", async () => {
    const [p, q] = [await makeProduct(), await makeProduct()];
    await recordSale("2035-05-05", p.id, 1);
    const first = await popularAt("2035-05-05T10:00:00.000Z");
    expect(ranked(first.body)).toEqual([[1, p.id, 1]]);

    await recordSale("2035-05-05", q.id, 9);
    const cached = await popularAt("2035-05-05T10:20:00.000Z");
    expect(cached.text).toBe(first.text);

    const nextDay = await popularAt("2035-05-06T00:00:00.000Z");
    expect(nextDay.body.generatedAt).toBe("2035-05-06T00:00:00.000Z");
    expect(ranked(nextDay.body)).toEqual([
      [1, q.id, 9],
      [2, p.id, 1],
    ]);
  });

  it("at 00:00 UTC, when every reader misses the new day's entry, 50 concurrent requests make one ranking query", async () => {
    const product = await makeProduct();
    await recordSale("2037-08-08", product.id, 2);
    const d1 = countingD1(/product_sales_daily/);
    const lastMoment = createApp({ clock: fixedClock("2037-08-07T23:59:59.999Z") });
    expect((await d1.get(lastMoment, "/api/products/popular")).status).toBe(200);
    expect(d1.count()).toBe(1);

    const midnight = createApp({ clock: fixedClock("2037-08-08T00:00:00.000Z") });
    const answers = await Promise.all(Array.from({ length: 50 }, () => d1.get(midnight, "/api/products/popular")));
    expect(answers.every((a) => a.status === 200)).toBe(true);
    expect(new Set(answers.map((a) => a.text)).size).toBe(1);
    expect(ranked(JSON.parse(answers[0]!.text))).toEqual([[1, product.id, 2]]);
    expect(d1.count()).toBe(2);
  });

  it("sends Cache-Control and a strong ETag; If-None-Match with it gives a bodiless 304", async () => {
    const res = await popularAt("2036-01-01T00:00:00.000Z");
    expect(res.headers.get("cache-control")).toBe("public, no-cache");
    const tag = res.headers.get("etag");
    expect(tag).toMatch(/^"[0-9a-f]{64}"$/);
    const again = await popularAt("2036-01-01T00:05:00.000Z", { "If-None-Match": tag! });
    expect(again.status).toBe(304);
    expect(again.text).toBe("");
  });
});
