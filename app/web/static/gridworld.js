// The grid world equiserve/GridWorldC4-v0 (app/tasks/act/envs.py) drawn from one observation:
// the agent, goal and wall planes of an N x N grid, each flattened row-major, one after another.
// Seen from above, row 0 at the top, as the environment's own render.

const COLOURS = { floor: "#ebebeb", wall: "#5a5a5a", goal: "#3caa50", agent: "#d23c32" };
// (row, column) steps of the moves, by the names the model card gives its actions
const MOVES = { up: [-1, 0], right: [0, 1], down: [1, 0], left: [0, -1] };

/** The grid's side N, or null when `observation` is not three N x N planes. */
export function gridSize(observation) {
  if (!Array.isArray(observation) || observation.length % 3) return null;
  const size = Math.round(Math.sqrt(observation.length / 3));
  return size > 0 && size * size * 3 === observation.length ? size : null;
}

/** Draw `observation`; with `move` (an action's name), an arrow from the agent the way it moves. */
export function draw(canvas, observation, move = null) {
  const size = gridSize(observation);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (size === null) return;
  const cell = Math.floor(Math.min(canvas.width, canvas.height) / size);
  const plane = (p, r, c) => observation[p * size * size + r * size + c] > 0.5;
  let agent = null;
  for (let r = 0; r < size; r++) {
    for (let c = 0; c < size; c++) {
      let kind = "floor";
      if (plane(2, r, c)) kind = "wall";
      else if (plane(1, r, c)) kind = "goal";
      if (plane(0, r, c)) {
        kind = "agent";
        agent = [r, c];
      }
      ctx.fillStyle = COLOURS[kind];
      ctx.fillRect(c * cell + 1, r * cell + 1, cell - 2, cell - 2);
    }
  }
  const step = MOVES[move];
  if (!agent || !step) return;
  const [cy, cx] = [(agent[0] + 0.5) * cell, (agent[1] + 0.5) * cell];
  const [ty, tx] = [cy + step[0] * cell * 0.8, cx + step[1] * cell * 0.8];
  ctx.strokeStyle = ctx.fillStyle = "#1b1f24";
  ctx.lineWidth = 3;
  ctx.beginPath();
  ctx.moveTo(cx, cy);
  ctx.lineTo(tx, ty);
  ctx.stroke();
  const angle = Math.atan2(ty - cy, tx - cx), head = cell * 0.2;
  ctx.beginPath();
  ctx.moveTo(tx, ty);
  ctx.lineTo(tx - head * Math.cos(angle - 0.5), ty - head * Math.sin(angle - 0.5));
  ctx.lineTo(tx - head * Math.cos(angle + 0.5), ty - head * Math.sin(angle + 0.5));
  ctx.closePath();
  ctx.fill();
}
