// The coupon storm over a sharded coupon (docs/sharded-coupons.md): the same users and pieces as
// coupon-storm, one coupon of 16 gate objects. Exact as the single gate, plus how the requests spread
// over the shards and how many quota transfers it took.
import { runLoad } from "./load.mjs";
import { couponCheck, invariant } from "./invariants.mjs";

const SHARDS = 16;

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
    const winners = [];
    let next = 0;
    let overflow = 0;
    const jobs = users.map((user) => ({
      method: "POST",
      path: `/api/coupons/${coupon.id}/issue`,
      token: user.token,
      body: {},
      onAnswer: (status) => {
        if (status === 200) winners.push(user.id);
      },
    }));
    const load = await runLoad({
      baseUrl: ctx.baseUrl,
      concurrency: ctx.concurrency,
      amount: jobs.length,
      nextJob: () => {
        if (next >= jobs.length) overflow++;
        return jobs[next++ % jobs.length];
      },
      expected: ["200", "400 COUPON_SOLD_OUT"],
    });

    const after = await ctx.api.getCoupon(coupon.id);
    const { items } = await ctx.api.admin("GET", `/api/admin/coupons/${coupon.id}/shards`);
    const reached = items.reduce((n, s) => n + s.requests, 0);
    const quota = items.reduce((n, s) => n + (s.quota ?? 0), 0);
    const issuedInObjects = items.reduce((n, s) => n + s.issued, 0);
    const transfers = items.reduce((n, s) => n + s.transfersGiven, 0);
    const share = items.map((s) => `${s.shard}:${((100 * s.requests) / Math.max(1, reached)).toFixed(1)}%`).join(" ");
    const got = Object.entries(load.outcomes).map(([k, v]) => `${v} × ${k}`).join(", ");
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
        piecesTransferred: items.reduce((n, s) => n + s.piecesGiven, 0),
        requestsPerShard: items.map((s) => s.requests),
        issuedPerShard: items.map((s) => s.issued),
      },
      invariants: [
        invariant("each user sent exactly once", overflow === 0, `${overflow} extra requests`),
        invariant(
          `answers: ${couponQuantity} × 200, ${couponUsers - couponQuantity} × 400 COUPON_SOLD_OUT`,
          load.requests === couponUsers &&
            (load.outcomes["200"] ?? 0) === couponQuantity &&
            (load.outcomes["400 COUPON_SOLD_OUT"] ?? 0) === couponUsers - couponQuantity &&
            load.errors === 0,
          got + (load.errors ? `; ${load.errors} errors` : ""),
        ),
        invariant(
          `exactly ${couponQuantity} issued (API issuedCount)`,
          after.issuedCount === couponQuantity,
          `issuedCount ${after.issuedCount} of ${after.totalQuantity}`,
        ),
        invariant(
          "the shards' quotas sum to the total, their counts to the issued, nothing in transit",
          quota === couponQuantity && issuedInObjects === couponQuantity && items.every((s) => s.openIntents === 0 && s.pending === 0),
          `quota ${quota}, issued in objects ${issuedInObjects}, open intents ${items.reduce((n, s) => n + s.openIntents, 0)}`,
        ),
      ],
      d1Checks: [couponCheck(coupon.id, { issued: couponQuantity, winners })],
    };
  },
};
