// The scenarios' sizes: default (npm run bench, bench:profile) and --quick.
export const SIZES = {
  default: {
    readSeconds: 8,
    chargeRequests: 1_000,
    couponUsers: 5_000,
    couponQuantity: 1_000,
    buyers: 3_000,
    stock: 1_000,
    cancels: 1_000,
    cancelStormOrders: 1_000,
    cancelLeftover: 50,
    mixedUsers: 500,
    mixedRequests: 2_000,
  },
  quick: {
    readSeconds: 2,
    chargeRequests: 300,
    couponUsers: 500,
    couponQuantity: 100,
    buyers: 300,
    stock: 100,
    cancels: 100,
    cancelStormOrders: 100,
    cancelLeftover: 5,
    mixedUsers: 100,
    mixedRequests: 300,
  },
};
