// How a coupon is spread over gate objects (docs/sharded-coupons.md). A user always lands on the same shard,
// so "at most one per user" is decided by that shard alone; the total is kept by each shard's quota.

export const MAX_SHARDS = 64;

/**
 * The user's shard: the high bits of a multiplicative (Knuth) hash of the id, so consecutive ids spread
 * out. Exact integer arithmetic: `Math.imul` is the product modulo 2^32.
 */
export function shardOf(userId: number, shards: number): number {
  if (shards <= 1) return 0;
  const hash = Math.imul(userId % 2 ** 31, 2654435761) >>> 0;
  return (hash >>> 16) % shards;
}

/**
 * `shardOf` in SQL, over integer expressions: SQLite's 64-bit integers hold the product exactly, and the
 * operands are non-negative, so `%` and `>>` agree with the JS above (migration 0008 spells it out too).
 */
export const shardOfSql = (userId: string, shards: string) => `((((${userId} % 2147483648) * 2654435761) % 4294967296) >> 16) % ${shards}`;

/** The gate object of one shard. Shard 0 is the coupon's single gate, so a coupon of 1 shard is served as ever. */
export function gateName(couponId: number, shard: number): string {
  return shard === 0 ? String(couponId) : `${couponId}:${shard}`;
}

/** The quota a shard starts with: the total split evenly, the first `total % shards` shards one piece more. */
export function initialQuota(total: number, shards: number, shard: number): number {
  return Math.floor(total / shards) + (shard < total % shards ? 1 : 0);
}
