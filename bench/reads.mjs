// Scenarios that read (the floor and the catalog) and the charge storm on one wallet.
import { runLoad } from "./load.mjs";
import { balancesCheck, invariant, ledgerCheck } from "./invariants.mjs";

const CATALOG_PRODUCTS = 20;

/** The products browsed by the catalog and mixed scenarios, created once per run. */
export async function catalogProducts(ctx) {
  ctx.catalog ??= (async () => {
    const made = [];
    for (let i = 1; i <= CATALOG_PRODUCTS; i++) {
      made.push(await ctx.api.createProduct(`bench catalog ${i}`, 1_000 * i, 1_000_000));
    }
    // The first list read after a product change fills the KV cache; the scenario measures hits.
    await ctx.api.call("GET", "/api/products");
    return made;
  })();
  return ctx.catalog;
}

// Measured first and again last: the machine is shared, so ratios use the mean of both.
const measureFloor = (name, describe) => ({
  name,
  describe,
  async run(ctx) {
    const load = await runLoad({
      baseUrl: ctx.baseUrl,
      concurrency: ctx.concurrency,
      duration: ctx.sizes.readSeconds,
      nextJob: () => ({ path: "/health" }),
      expected: ["200"],
    });
    return { load, invariants: [], d1Checks: [] };
  },
});

export const floor = measureFloor("floor", "GET /health (no-op Worker route), first");
export const floorEnd = measureFloor("floor-end", "GET /health again, last");

export const catalogList = {
  name: "catalog-list",
  describe: "GET /api/products (KV cache hit)",
  async run(ctx) {
    await catalogProducts(ctx);
    const load = await runLoad({
      baseUrl: ctx.baseUrl,
      concurrency: ctx.concurrency,
      duration: ctx.sizes.readSeconds,
      nextJob: () => ({ path: "/api/products" }),
      expected: ["200"],
    });
    return { load, invariants: [], d1Checks: [] };
  },
};

export const catalogDetail = {
  name: "catalog-detail",
  describe: "GET /api/products/{id} over 20 products",
  async run(ctx) {
    const products = await catalogProducts(ctx);
    let i = 0;
    const load = await runLoad({
      baseUrl: ctx.baseUrl,
      concurrency: ctx.concurrency,
      duration: ctx.sizes.readSeconds,
      nextJob: () => ({ path: `/api/products/${products[i++ % products.length].id}` }),
      expected: ["200"],
    });
    return { load, invariants: [], d1Checks: [] };
  },
};

const CHARGE_AMOUNT = 1;

export const chargeStorm = {
  name: "charge-storm",
  describe: "POST /api/balance/charge, one wallet, amount 1, by an admin for the user",
  write: true,
  async run(ctx) {
    const { id } = await ctx.api.admin("POST", "/api/admin/users", { name: "bench charge-storm wallet" });
    // Sent by an admin acting for the user: a user may send only 20 state-changing requests per 10 s, admins
    // are not limited, and the charges still all race for the one wallet.
    const token = ctx.api.adminToken;
    let charged = 0;
    const load = await runLoad({
      baseUrl: ctx.baseUrl,
      concurrency: ctx.concurrency,
      amount: ctx.sizes.chargeRequests,
      nextJob: () => ({
        method: "POST",
        path: "/api/balance/charge",
        token,
        body: { userId: id, amount: CHARGE_AMOUNT },
        onAnswer: (status) => {
          if (status === 200) charged++;
        },
      }),
      expected: ["200"],
    });

    const { balance } = await ctx.api.admin("GET", `/api/balance/${id}`);
    const expectedBalance = charged * CHARGE_AMOUNT;
    const history = await ctx.api.admin("GET", `/api/users/balance/history?userId=${id}&limit=1`);
    return {
      load,
      invariants: [
        invariant(
          "balance == sum of successful charges (API)",
          balance === expectedBalance,
          `balance ${balance}, ${charged} charges of ${CHARGE_AMOUNT} answered 200`,
        ),
        invariant(
          "newest transaction's balanceAfter == balance (API)",
          history.items[0]?.balanceAfter === balance,
          `balanceAfter ${history.items[0]?.balanceAfter}`,
        ),
      ],
      d1Checks: [ledgerCheck([id]), balancesCheck(new Map([[id, expectedBalance]]), "balance == successful charges")],
    };
  },
};
