import { DurableObject } from "cloudflare:workers";

/** One per coupon: the authority on who gets it. Admission logic lands with the coupons feature. */
export class CouponGate extends DurableObject<Env> {}
