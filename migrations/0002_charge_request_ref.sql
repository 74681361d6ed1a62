ALTER TABLE `wallet_transactions` ADD `request_ref` text;--> statement-breakpoint
CREATE UNIQUE INDEX `wallet_transactions_request_ref_uq` ON `wallet_transactions` (`request_ref`);