CREATE TABLE `coupons` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`name` text NOT NULL,
	`discount_type` text NOT NULL,
	`discount_value` integer NOT NULL,
	`min_order_amount` integer DEFAULT 0 NOT NULL,
	`total_quantity` integer NOT NULL,
	`issued_count` integer DEFAULT 0 NOT NULL,
	`issue_starts_at` text,
	`issue_ends_at` text,
	`valid_days` integer NOT NULL,
	`created_at` text NOT NULL,
	CONSTRAINT "coupons_discount_type" CHECK("coupons"."discount_type" IN ('FIXED', 'PERCENT')),
	CONSTRAINT "coupons_discount_value" CHECK("coupons"."discount_value" >= 1 AND ("coupons"."discount_type" = 'FIXED' OR "coupons"."discount_value" <= 100)),
	CONSTRAINT "coupons_min_order_amount" CHECK("coupons"."min_order_amount" >= 0),
	CONSTRAINT "coupons_total_quantity" CHECK("coupons"."total_quantity" >= 1),
	CONSTRAINT "coupons_issued_within_total" CHECK("coupons"."issued_count" >= 0 AND "coupons"."issued_count" <= "coupons"."total_quantity"),
	CONSTRAINT "coupons_valid_days" CHECK("coupons"."valid_days" >= 1)
);
--> statement-breakpoint
CREATE TABLE `idempotency_keys` (
	`scope` text NOT NULL,
	`key` text NOT NULL,
	`request_hash` text NOT NULL,
	`state` text NOT NULL,
	`response_status` integer,
	`response_body` text,
	`locked_until` text NOT NULL,
	`created_at` text NOT NULL,
	`expires_at` text NOT NULL,
	PRIMARY KEY(`scope`, `key`),
	CONSTRAINT "idempotency_keys_state" CHECK("idempotency_keys"."state" IN ('IN_PROGRESS', 'DONE'))
);
--> statement-breakpoint
CREATE INDEX `idempotency_keys_expires_idx` ON `idempotency_keys` (`expires_at`);--> statement-breakpoint
CREATE TABLE `order_exports` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`order_id` integer NOT NULL,
	`status` text DEFAULT 'PENDING' NOT NULL,
	`attempts` integer DEFAULT 0 NOT NULL,
	`last_error` text,
	`created_at` text NOT NULL,
	`updated_at` text NOT NULL,
	`sent_at` text,
	FOREIGN KEY (`order_id`) REFERENCES `orders`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "order_exports_status" CHECK("order_exports"."status" IN ('PENDING', 'SENT', 'FAILED'))
);
--> statement-breakpoint
CREATE UNIQUE INDEX `order_exports_order_uq` ON `order_exports` (`order_id`);--> statement-breakpoint
CREATE INDEX `order_exports_status_newest_idx` ON `order_exports` (`status`,`created_at`,`id`);--> statement-breakpoint
CREATE TABLE `order_items` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`order_id` integer NOT NULL,
	`product_id` integer NOT NULL,
	`name` text NOT NULL,
	`unit_price` integer NOT NULL,
	`quantity` integer NOT NULL,
	`amount` integer NOT NULL,
	FOREIGN KEY (`order_id`) REFERENCES `orders`(`id`) ON UPDATE no action ON DELETE no action,
	FOREIGN KEY (`product_id`) REFERENCES `products`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "order_items_quantity" CHECK("order_items"."quantity" >= 1 AND "order_items"."quantity" <= 100),
	CONSTRAINT "order_items_amount" CHECK("order_items"."amount" = "order_items"."unit_price" * "order_items"."quantity")
);
--> statement-breakpoint
CREATE UNIQUE INDEX `order_items_order_product_uq` ON `order_items` (`order_id`,`product_id`);--> statement-breakpoint
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
	FOREIGN KEY (`user_id`) REFERENCES `users`(`id`) ON UPDATE no action ON DELETE no action,
	FOREIGN KEY (`user_coupon_id`) REFERENCES `user_coupons`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "orders_status" CHECK("orders"."status" IN ('COMPLETED')),
	CONSTRAINT "orders_amounts" CHECK("orders"."total_amount" >= 0 AND "orders"."discount_amount" >= 0 AND "orders"."discount_amount" <= "orders"."total_amount" AND "orders"."paid_amount" = "orders"."total_amount" - "orders"."discount_amount")
);
--> statement-breakpoint
CREATE UNIQUE INDEX `orders_order_key_uq` ON `orders` (`order_key`);--> statement-breakpoint
CREATE UNIQUE INDEX `orders_user_coupon_uq` ON `orders` (`user_coupon_id`);--> statement-breakpoint
CREATE INDEX `orders_user_newest_idx` ON `orders` (`user_id`,`created_at`,`id`);--> statement-breakpoint
CREATE TABLE `outbox` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`order_id` integer NOT NULL,
	`topic` text NOT NULL,
	`payload` text NOT NULL,
	`created_at` text NOT NULL,
	`dispatched_at` text,
	FOREIGN KEY (`order_id`) REFERENCES `orders`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "outbox_topic" CHECK("outbox"."topic" IN ('stats', 'export'))
);
--> statement-breakpoint
CREATE UNIQUE INDEX `outbox_order_topic_uq` ON `outbox` (`order_id`,`topic`);--> statement-breakpoint
CREATE INDEX `outbox_undispatched_idx` ON `outbox` (`dispatched_at`,`created_at`);--> statement-breakpoint
CREATE TABLE `product_sales_daily` (
	`stat_date` text NOT NULL,
	`product_id` integer NOT NULL,
	`quantity` integer NOT NULL,
	PRIMARY KEY(`stat_date`, `product_id`),
	FOREIGN KEY (`product_id`) REFERENCES `products`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "product_sales_daily_quantity" CHECK("product_sales_daily"."quantity" >= 0)
);
--> statement-breakpoint
CREATE TABLE `products` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`name` text NOT NULL,
	`price` integer NOT NULL,
	`stock` integer NOT NULL,
	`created_at` text NOT NULL,
	`updated_at` text NOT NULL,
	CONSTRAINT "products_price_non_negative" CHECK("products"."price" >= 0),
	CONSTRAINT "products_stock_non_negative" CHECK("products"."stock" >= 0)
);
--> statement-breakpoint
CREATE INDEX `products_newest_idx` ON `products` (`created_at`,`id`);--> statement-breakpoint
CREATE TABLE `stats_counted_orders` (
	`order_id` integer PRIMARY KEY NOT NULL,
	`counted_at` text NOT NULL
);
--> statement-breakpoint
CREATE TABLE `user_coupons` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`coupon_id` integer NOT NULL,
	`user_id` integer NOT NULL,
	`status` text DEFAULT 'AVAILABLE' NOT NULL,
	`issued_at` text NOT NULL,
	`expires_at` text NOT NULL,
	`used_at` text,
	`order_id` integer,
	FOREIGN KEY (`coupon_id`) REFERENCES `coupons`(`id`) ON UPDATE no action ON DELETE no action,
	FOREIGN KEY (`user_id`) REFERENCES `users`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "user_coupons_status" CHECK("user_coupons"."status" IN ('AVAILABLE', 'USED', 'EXPIRED'))
);
--> statement-breakpoint
CREATE UNIQUE INDEX `user_coupons_coupon_user_uq` ON `user_coupons` (`coupon_id`,`user_id`);--> statement-breakpoint
CREATE INDEX `user_coupons_user_status_idx` ON `user_coupons` (`user_id`,`status`,`expires_at`);--> statement-breakpoint
CREATE TABLE `users` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`name` text NOT NULL,
	`balance` integer DEFAULT 0 NOT NULL,
	`created_at` text NOT NULL,
	`updated_at` text NOT NULL,
	CONSTRAINT "users_balance_non_negative" CHECK("users"."balance" >= 0),
	CONSTRAINT "users_balance_within_limit" CHECK("users"."balance" <= 10000000)
);
--> statement-breakpoint
CREATE INDEX `users_newest_idx` ON `users` (`created_at`,`id`);--> statement-breakpoint
CREATE TABLE `wallet_transactions` (
	`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL,
	`user_id` integer NOT NULL,
	`type` text NOT NULL,
	`amount` integer NOT NULL,
	`balance_after` integer NOT NULL,
	`order_id` integer,
	`created_at` text NOT NULL,
	FOREIGN KEY (`user_id`) REFERENCES `users`(`id`) ON UPDATE no action ON DELETE no action,
	FOREIGN KEY (`order_id`) REFERENCES `orders`(`id`) ON UPDATE no action ON DELETE no action,
	CONSTRAINT "wallet_transactions_type" CHECK("wallet_transactions"."type" IN ('CHARGE', 'PAYMENT', 'REFUND')),
	CONSTRAINT "wallet_transactions_amount_sign" CHECK(("wallet_transactions"."type" = 'PAYMENT' AND "wallet_transactions"."amount" < 0) OR ("wallet_transactions"."type" <> 'PAYMENT' AND "wallet_transactions"."amount" > 0)),
	CONSTRAINT "wallet_transactions_balance_after" CHECK("wallet_transactions"."balance_after" >= 0)
);
--> statement-breakpoint
CREATE INDEX `wallet_transactions_user_newest_idx` ON `wallet_transactions` (`user_id`,`created_at`,`id`);