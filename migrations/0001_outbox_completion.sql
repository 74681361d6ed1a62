ALTER TABLE `outbox` ADD `completed_at` text;--> statement-breakpoint
CREATE INDEX `outbox_incomplete_idx` ON `outbox` (`dispatched_at`) WHERE "outbox"."completed_at" IS NULL;