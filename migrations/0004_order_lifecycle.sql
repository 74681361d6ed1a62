-- Rewrites drizzle-kit's SQLite table rebuilds into an order D1 accepts on tables that hold rows.
--
-- drizzle-kit rebuilds a table as: CREATE __new_t; INSERT INTO __new_t SELECT FROM t; DROP t; RENAME
-- __new_t TO t, wrapped in PRAGMA foreign_keys=OFF/ON. D1 runs a migration as one transaction with
-- foreign keys enforced, where foreign_keys=OFF does nothing: dropping a parent table counts its
-- children as violations, and only rows inserted into a table of that very name clear them. So each
-- rebuild becomes: copy aside, drop, create under the real name, insert back, drop the copy; with the
-- checks deferred to the commit. drizzle-kit also selects newly added columns from the old table; those
-- are left to their defaults.
PRAGMA defer_foreign_keys = on;--> statement-breakpoint
CREATE TABLE `stats_counted_cancellations` (
	`order_id` integer PRIMARY KEY NOT NULL,
	`counted_at` text NOT NULL
);
--> statement-breakpoint
CREATE TABLE `user_product_purchases` (
	`user_id` integer NOT NULL,
	`product_id` integer NOT NULL,
	`quantity` integer NOT NULL,
	`max_per_user` integer,
	PRIMARY KEY(`user_id`, `product_id`),
	FOREIGN KEY (`user_id`) REFERENCES `users`(`id`) ON UPDATE no action ON DELETE no action,
	FOREIGN KEY (`product_id`) REFERENCES `products`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "user_product_purchases_quantity" CHECK("user_product_purchases"."quantity" >= 0),
	CONSTRAINT "user_product_purchases_within_limit" CHECK("user_product_purchases"."max_per_user" IS NULL OR "user_product_purchases"."quantity" <= "user_product_purchases"."max_per_user")
);
--> statement-breakpoint
CREATE TABLE `__copy_orders` AS SELECT * FROM `orders`;--> statement-breakpoint
DROP TABLE `orders`;--> statement-breakpoint
CREATE TABLE `orders` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`order_key` text NOT NULL,
	`user_id` integer NOT NULL,
	`status` text DEFAULT 'COMPLETED' NOT NULL,
	`total_amount` integer NOT NULL,
	`discount_amount` integer NOT NULL,
	`paid_amount` integer NOT NULL,
	`user_coupon_id` integer,
	`created_at` text NOT NULL,
	`cancelled_at` text,
	`cancel_reason` text,
	FOREIGN KEY (`user_id`) REFERENCES `users`(`id`) ON UPDATE no action ON DELETE no action,
	FOREIGN KEY (`user_coupon_id`) REFERENCES `user_coupons`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "orders_status" CHECK("orders"."status" IN ('COMPLETED', 'CANCELLED')),
	CONSTRAINT "orders_cancelled_at" CHECK(("orders"."status" = 'CANCELLED') = ("orders"."cancelled_at" IS NOT NULL)),
	CONSTRAINT "orders_amounts" CHECK("orders"."total_amount" >= 0 AND "orders"."discount_amount" >= 0 AND "orders"."discount_amount" <= "orders"."total_amount" AND "orders"."paid_amount" = "orders"."total_amount" - "orders"."discount_amount")
);
--> statement-breakpoint
INSERT INTO `orders`("id", "order_key", "user_id", "status", "total_amount", "discount_amount", "paid_amount", "user_coupon_id", "created_at") SELECT "id", "order_key", "user_id", "status", "total_amount", "discount_amount", "paid_amount", "user_coupon_id", "created_at" FROM `__copy_orders`;--> statement-breakpoint
DROP TABLE `__copy_orders`;--> statement-breakpoint
CREATE UNIQUE INDEX `orders_order_key_uq` ON `orders` (`order_key`);--> statement-breakpoint
CREATE UNIQUE INDEX `orders_user_coupon_uq` ON `orders` (`user_coupon_id`) WHERE "orders"."status" = 'COMPLETED';--> statement-breakpoint
CREATE INDEX `orders_user_newest_idx` ON `orders` (`user_id`,`created_at`,`id`);--> statement-breakpoint
CREATE TABLE `__copy_users` AS SELECT * FROM `users`;--> statement-breakpoint
DROP TABLE `users`;--> statement-breakpoint
CREATE TABLE `users` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`name` text NOT NULL,
	`balance` integer DEFAULT 0 NOT NULL,
	`created_at` text NOT NULL,
	`updated_at` text NOT NULL,
	CONSTRAINT "users_balance_non_negative" CHECK("users"."balance" >= 0)
);
--> statement-breakpoint
INSERT INTO `users`("id", "name", "balance", "created_at", "updated_at") SELECT "id", "name", "balance", "created_at", "updated_at" FROM `__copy_users`;--> statement-breakpoint
DROP TABLE `__copy_users`;--> statement-breakpoint
CREATE INDEX `users_newest_idx` ON `users` (`created_at`,`id`);--> statement-breakpoint
CREATE TABLE `__copy_order_exports` AS SELECT * FROM `order_exports`;--> statement-breakpoint
DROP TABLE `order_exports`;--> statement-breakpoint
CREATE TABLE `order_exports` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`order_id` integer NOT NULL,
	`event` text DEFAULT 'PLACED' NOT NULL,
	`status` text DEFAULT 'PENDING' NOT NULL,
	`attempts` integer DEFAULT 0 NOT NULL,
	`last_error` text,
	`created_at` text NOT NULL,
	`updated_at` text NOT NULL,
	`sent_at` text,
	FOREIGN KEY (`order_id`) REFERENCES `orders`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "order_exports_status" CHECK("order_exports"."status" IN ('PENDING', 'SENT', 'FAILED')),
	CONSTRAINT "order_exports_event" CHECK("order_exports"."event" IN ('PLACED', 'CANCELLED'))
);
--> statement-breakpoint
INSERT INTO `order_exports`("id", "order_id", "status", "attempts", "last_error", "created_at", "updated_at", "sent_at") SELECT "id", "order_id", "status", "attempts", "last_error", "created_at", "updated_at", "sent_at" FROM `__copy_order_exports`;--> statement-breakpoint
DROP TABLE `__copy_order_exports`;--> statement-breakpoint
CREATE UNIQUE INDEX `order_exports_order_event_uq` ON `order_exports` (`order_id`,`event`);--> statement-breakpoint
CREATE INDEX `order_exports_status_newest_idx` ON `order_exports` (`status`,`created_at`,`id`);--> statement-breakpoint
CREATE INDEX `order_exports_newest_idx` ON `order_exports` (`created_at`,`id`);--> statement-breakpoint
CREATE TABLE `__copy_outbox` AS SELECT * FROM `outbox`;--> statement-breakpoint
DROP TABLE `outbox`;--> statement-breakpoint
CREATE TABLE `outbox` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`order_id` integer NOT NULL,
	`topic` text NOT NULL,
	`event` text DEFAULT 'PLACED' NOT NULL,
	`payload` text NOT NULL,
	`created_at` text NOT NULL,
	`dispatched_at` text,
	`completed_at` text,
	FOREIGN KEY (`order_id`) REFERENCES `orders`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "outbox_topic" CHECK("outbox"."topic" IN ('stats', 'export')),
	CONSTRAINT "outbox_event" CHECK("outbox"."event" IN ('PLACED', 'CANCELLED'))
);
--> statement-breakpoint
INSERT INTO `outbox`("id", "order_id", "topic", "payload", "created_at", "dispatched_at", "completed_at") SELECT "id", "order_id", "topic", "payload", "created_at", "dispatched_at", "completed_at" FROM `__copy_outbox`;--> statement-breakpoint
DROP TABLE `__copy_outbox`;--> statement-breakpoint
CREATE UNIQUE INDEX `outbox_order_topic_event_uq` ON `outbox` (`order_id`,`topic`,`event`);--> statement-breakpoint
CREATE INDEX `outbox_undispatched_idx` ON `outbox` (`dispatched_at`,`created_at`);--> statement-breakpoint
CREATE INDEX `outbox_incomplete_idx` ON `outbox` (`dispatched_at`) WHERE "outbox"."completed_at" IS NULL;--> statement-breakpoint
CREATE TABLE `__copy_coupons` AS SELECT * FROM `coupons`;--> statement-breakpoint
DROP TABLE `coupons`;--> statement-breakpoint
CREATE TABLE `coupons` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`name` text NOT NULL,
	`discount_type` text NOT NULL,
	`discount_value` integer NOT NULL,
	`min_order_amount` integer DEFAULT 0 NOT NULL,
	`max_discount_amount` integer,
	`total_quantity` integer NOT NULL,
	`issued_count` integer DEFAULT 0 NOT NULL,
	`issue_starts_at` text,
	`issue_ends_at` text,
	`valid_days` integer NOT NULL,
	`created_at` text NOT NULL,
	CONSTRAINT "coupons_discount_type" CHECK("coupons"."discount_type" IN ('FIXED', 'PERCENT')),
	CONSTRAINT "coupons_discount_value" CHECK("coupons"."discount_value" >= 1 AND ("coupons"."discount_type" = 'FIXED' OR "coupons"."discount_value" <= 100)),
	CONSTRAINT "coupons_min_order_amount" CHECK("coupons"."min_order_amount" >= 0),
	CONSTRAINT "coupons_max_discount_amount" CHECK("coupons"."max_discount_amount" IS NULL OR ("coupons"."discount_type" = 'PERCENT' AND "coupons"."max_discount_amount" >= 1)),
	CONSTRAINT "coupons_total_quantity" CHECK("coupons"."total_quantity" >= 1),
	CONSTRAINT "coupons_issued_within_total" CHECK("coupons"."issued_count" >= 0 AND "coupons"."issued_count" <= "coupons"."total_quantity"),
	CONSTRAINT "coupons_valid_days" CHECK("coupons"."valid_days" >= 1)
);
--> statement-breakpoint
INSERT INTO `coupons`("id", "name", "discount_type", "discount_value", "min_order_amount", "total_quantity", "issued_count", "issue_starts_at", "issue_ends_at", "valid_days", "created_at") SELECT "id", "name", "discount_type", "discount_value", "min_order_amount", "total_quantity", "issued_count", "issue_starts_at", "issue_ends_at", "valid_days", "created_at" FROM `__copy_coupons`;--> statement-breakpoint
DROP TABLE `__copy_coupons`;--> statement-breakpoint
CREATE TABLE `__copy_products` AS SELECT * FROM `products`;--> statement-breakpoint
DROP TABLE `products`;--> statement-breakpoint
CREATE TABLE `products` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`name` text NOT NULL,
	`price` integer NOT NULL,
	`stock` integer NOT NULL,
	`max_per_user` integer,
	`created_at` text NOT NULL,
	`updated_at` text NOT NULL,
	CONSTRAINT "products_price_non_negative" CHECK("products"."price" >= 0),
	CONSTRAINT "products_stock_non_negative" CHECK("products"."stock" >= 0),
	CONSTRAINT "products_max_per_user" CHECK("products"."max_per_user" IS NULL OR "products"."max_per_user" >= 1)
);
--> statement-breakpoint
INSERT INTO `products`("id", "name", "price", "stock", "created_at", "updated_at") SELECT "id", "name", "price", "stock", "created_at", "updated_at" FROM `__copy_products`;--> statement-breakpoint
DROP TABLE `__copy_products`;--> statement-breakpoint
CREATE INDEX `products_newest_idx` ON `products` (`created_at`,`id`);--> statement-breakpoint
CREATE UNIQUE INDEX `wallet_transactions_one_refund_uq` ON `wallet_transactions` (`order_id`) WHERE "wallet_transactions"."type" = 'REFUND';