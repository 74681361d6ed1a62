CREATE TABLE `coupon_shard_counts` (
	`coupon_id` integer NOT NULL,
	`shard` integer NOT NULL,
	`issued_count` integer NOT NULL,
	PRIMARY KEY(`coupon_id`, `shard`),
	FOREIGN KEY (`coupon_id`) REFERENCES `coupons`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "coupon_shard_counts_shard" CHECK("coupon_shard_counts"."shard" >= 0 AND "coupon_shard_counts"."shard" < 64),
	CONSTRAINT "coupon_shard_counts_issued" CHECK("coupon_shard_counts"."issued_count" >= 0)
);
--> statement-breakpoint
-- Coupons sharded before this table: each shard's count from its users' rows. The shard is shardOf
-- (src/coupons/shards.ts) in SQLite's 64-bit integers, where the product is exact; the tests check this
-- backfill against the counts the gates' own batches keep.
INSERT INTO `coupon_shard_counts` (`coupon_id`, `shard`, `issued_count`)
SELECT u.`coupon_id`, ((((u.`user_id` % 2147483648) * 2654435761) % 4294967296) >> 16) % c.`shards`, count(*)
FROM `user_coupons` u JOIN `coupons` c ON c.`id` = u.`coupon_id`
WHERE c.`shards` > 1
GROUP BY 1, 2;
