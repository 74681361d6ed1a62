// The coupon storm over a sharded coupon (docs/sharded-coupons.md): the same users and pieces as
// coupon-storm, one coupon of 16 gate objects. Exact as the single gate, plus how the requests spread
// over the shards and how many quota transfers it took.
import { invariant } from "./invariants.mjs";
import { issueStorm } from "./storms.mjs";

const SHARDS = 16;

/**
 * The coupon's per-shard figures, as the audit's coupons check lists them (details.shardedCoupons: one array
 * entry per shard, null for a shard that was not live). The shards commit their last batches right after
 * answering: asks again, briefly, while the audit finds them busy.
 */
async function shardFigures(api, couponId) {
  for (let attempt = 1; ; attempt++) {
    const audit = await api.admin("GET", "/api/admin/audit");
    const coupons = audit.checks.find((c) => c.name === "coupons");
    const figures = coupons?.details.shardedCoupons?.find((f) => f.couponId === couponId);
    if (!figures) throw new Error(`the audit lists no shard figures for coupon ${couponId}: ${JSON.stringify(coupons?.details)}`);
    if (figures.gate !== "busy" || attempt === 10) return figures;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

export const couponStormSharded = {
  name: "coupon-storm-sharded",
  describe: `POST /api/coupons/{id}/issue, one per user, a coupon of ${SHARDS} shards`,
  write: true,
  async run(ctx) {
    const { couponUsers, couponQuantity } = ctx.sizes;
    const users = await ctx.pool.take(couponUsers);
    const coupon = await ctx.api.admin("POST", "/api/admin/coupons", {
      name: `bench sharded storm coupon x${couponQuantity}`,
      discountType: "FIXED",
      discountValue: 1_000,
      totalQuantity: couponQuantity,
      validDays: 7,
      shards: SHARDS,
    });
    const { load, winners, invariants, d1Checks } = await issueStorm(ctx, coupon, users, couponQuantity);
    const figures = await shardFigures(ctx.api, coupon.id);
    const sum = (values) => values.reduce((n, v) => n + (v ?? 0), 0);
    const reached = sum(figures.requests);
    const quota = sum(figures.quota);
    const issuedInObjects = sum(figures.issued);
    const transfers = sum(figures.transfersGiven);
    const share = figures.requests.map((r, shard) => `${shard}:${((100 * (r ?? 0)) / Math.max(1, reached)).toFixed(1)}%`).join(" ");
    console.log(`    shards: ${SHARDS}; requests that reached a gate: ${reached} of ${load.requests}; quota transfers: ${transfers}`);
    console.log(`    share of requests per shard: ${share}`);
    return {
      load,
      facts: {
        couponId: coupon.id,
        users: couponUsers,
        quantity: couponQuantity,
        issued: winners.length,
        shards: SHARDS,
        reachedGates: reached,
        answeredBySoldOutMark: load.requests - reached,
        quotaTransfers: transfers,
        piecesTransferred: sum(figures.piecesGiven),
        requestsPerShard: figures.requests,
        issuedPerShard: figures.issued,
      },
      invariants: [
        ...invariants,
        invariant(
          "the audit asked every shard and their counts agree with D1's",
          figures.gate === "agrees" && figures.issued.every((n) => n !== null),
          `audit: ${figures.gate}; shards not live: ${figures.issued.filter((n) => n === null).length}`,
        ),
        invariant(
          "the shards' quotas sum to the total, their counts to the issued, nothing in transit",
          quota === couponQuantity &&
            issuedInObjects === couponQuantity &&
            figures.openIntents.every((n) => n === 0) &&
            figures.pending.every((n) => n === 0),
          `quota ${quota}, issued in objects ${issuedInObjects}, open intents ${sum(figures.openIntents)}, pending ${sum(figures.pending)}`,
        ),
      ],
      d1Checks,
    };
  },
};
