import { createApp } from "./app";

const app = createApp();

export default {
  fetch: app.fetch,
} satisfies ExportedHandler<Env>;

export { CouponGate } from "./coupons/coupon-gate";
export { ProductStock } from "./orders/product-stock";
