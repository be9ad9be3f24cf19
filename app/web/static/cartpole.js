// CartPole-v1 as gymnasium defines it (gymnasium/envs/classic_control/cartpole.py): the same
// constants, the same Euler step in the same order, termination at |x| > 2.4 or |θ| > 12°,
// truncation after 500 steps, reward 1 per step. The state is kept in doubles (as gymnasium's
// float64 state); observations are rounded to float32, as gymnasium returns them.

export const CARTPOLE = Object.freeze({
  gravity: 9.8,
  masscart: 1.0,
  masspole: 0.1,
  length: 0.5, // half the pole's length
  forceMag: 10.0,
  tau: 0.02,
  thetaThreshold: (12 * 2 * Math.PI) / 360,
  xThreshold: 2.4,
  maxSteps: 500,
});

const TOTAL_MASS = CARTPOLE.masspole + CARTPOLE.masscart;
const POLEMASS_LENGTH = CARTPOLE.masspole * CARTPOLE.length;

/** One step: `[x, x_dot, theta, theta_dot]`, action 0 (push left) or 1 (push right). */
export function step(state, action) {
  const [x, xDot, theta, thetaDot] = state;
  const force = action === 1 ? CARTPOLE.forceMag : -CARTPOLE.forceMag;
  const costheta = Math.cos(theta);
  const sintheta = Math.sin(theta);
  const temp = (force + POLEMASS_LENGTH * thetaDot ** 2 * sintheta) / TOTAL_MASS;
  const thetaacc = (CARTPOLE.gravity * sintheta - costheta * temp)
    / (CARTPOLE.length * (4.0 / 3.0 - (CARTPOLE.masspole * costheta ** 2) / TOTAL_MASS));
  const xacc = temp - (POLEMASS_LENGTH * thetaacc * costheta) / TOTAL_MASS;
  const next = [x + CARTPOLE.tau * xDot, xDot + CARTPOLE.tau * xacc,
    theta + CARTPOLE.tau * thetaDot, thetaDot + CARTPOLE.tau * thetaacc];
  const terminated = next[0] < -CARTPOLE.xThreshold || next[0] > CARTPOLE.xThreshold
    || next[2] < -CARTPOLE.thetaThreshold || next[2] > CARTPOLE.thetaThreshold;
  return { state: next, terminated };
}

/** A small seeded generator (mulberry32): the same seed plays the same episode. */
export function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The start state: each variable uniform in [-0.05, 0.05), as gymnasium's reset. */
export function reset(random) {
  return Array.from({ length: 4 }, () => -0.05 + 0.1 * random());
}

export function observation(state) {
  return state.map(Math.fround);
}

/** Draw the cart and pole, scaled as gymnasium's renderer (the track spans ±2.4 m). */
export function draw(canvas, state) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const scale = width / (2 * CARTPOLE.xThreshold);
  const trackY = height * 0.7;
  const cartW = 50, cartH = 30, poleW = 10, poleLen = scale * 2 * CARTPOLE.length;
  const [x, , theta] = state;
  const cartX = x * scale + width / 2;
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, width, height);
  ctx.strokeStyle = "#000000";
  ctx.beginPath();
  ctx.moveTo(0, trackY);
  ctx.lineTo(width, trackY);
  ctx.stroke();
  ctx.fillStyle = "#000000";
  ctx.fillRect(cartX - cartW / 2, trackY - cartH / 2, cartW, cartH);
  ctx.save();
  ctx.translate(cartX, trackY - cartH / 4);
  ctx.rotate(theta); // θ > 0 leans the pole to the right (towards +x)
  ctx.fillStyle = "#ca9865";
  ctx.fillRect(-poleW / 2, -poleLen, poleW, poleLen);
  ctx.restore();
  ctx.fillStyle = "#8184cb";
  ctx.beginPath();
  ctx.arc(cartX, trackY - cartH / 4, poleW / 2, 0, 2 * Math.PI);
  ctx.fill();
}
