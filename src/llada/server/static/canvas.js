// The denoising canvas: one cell per answer position, shown as a mask until a step decides it, then as
// its token, coloured by the step that decided it. A Recording keeps every step's canvas, so that any
// step can be shown again (the replay slider).

export const MASK_GLYPH = "\u2592"; // ▒

// Colour scale from the first step (cool) to the last (warm); steps in between are interpolated.
const STOPS = [
  [49, 54, 149],
  [44, 123, 182],
  [65, 174, 118],
  [222, 192, 58],
  [230, 97, 51],
];

const SPECIAL_TOKEN = /^<\|([^|]*)\|>$/; // <|eot_id|>, <|endoftext|>, ...
const END_TOKEN = /^<\|(endoftext|eot_id)\|>$/; // LLaDA's EOS and end of turn: the answer ends at the first

/**
 * RGB colour of `step` on a scale whose last colour belongs to `lastStep`.
 * @param {number} step - 1-based.
 * @param {number} lastStep - the largest step shown.
 * @returns {number[]} [r, g, b].
 */
export function stepColour(step, lastStep) {
  const t = lastStep > 1 ? Math.min(Math.max((step - 1) / (lastStep - 1), 0), 1) : 0;
  const x = t * (STOPS.length - 1);
  const i = Math.min(Math.floor(x), STOPS.length - 2);
  const f = x - i;
  return STOPS[i].map((c, k) => Math.round(c + (STOPS[i + 1][k] - c) * f));
}

/** CSS gradient of the whole scale, for the legend. */
export function scaleGradient() {
  return `linear-gradient(to right, ${STOPS.map((c) => `rgb(${c.join(", ")})`).join(", ")})`;
}

/** Text colour that stays readable on `rgb` (relative luminance, sRGB weights). */
function textColour([r, g, b]) {
  return 0.2126 * r + 0.7152 * g + 0.0722 * b > 150 ? "#111" : "#fff";
}

/** What a cell shows for a token: invisible characters made visible, special tokens by name. */
function cellText(token) {
  const special = SPECIAL_TOKEN.exec(token);
  if (special) return special[1] === "endoftext" ? "EOS" : special[1].replace(/_id$/, "").toUpperCase(); // EOS, EOT
  if (token === "") return "\u2205"; // ∅: a token that decodes to no text on its own (part of a character)
  return token.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); // ↵ ⇥
}

/** Every canvas received for one answer, in order; step k is the k-th. */
export class Recording {
  constructor() {
    /** @type {{tokens: (string|null)[], decided: Set<number>}[]} */
    this.frames = [];
    /** @type {number[]} 1-based step that decided each position (undefined while masked) */
    this.stepOf = [];
  }

  /** Number of steps recorded. */
  get steps() {
    return this.frames.length;
  }

  /**
   * Record one step's canvas.
   * @param {{tokens: (string|null)[], decided?: number[]}} canvas - the server's canvas object.
   */
  add(canvas) {
    const step = this.frames.length + 1;
    const decided = new Set(canvas.decided ?? []);
    canvas.tokens.forEach((token, pos) => {
      // A position is decided by the step that first shows its token (the decided list says the same).
      if ((token !== null || decided.has(pos)) && this.stepOf[pos] === undefined) this.stepOf[pos] = step;
    });
    this.frames.push({ tokens: canvas.tokens.slice(), decided });
  }

  /** Positions decided by step `step` (1-based). */
  decidedBy(step) {
    return this.frames[step - 1].tokens.filter((token) => token !== null).length;
  }
}

/**
 * Show step `step` of `recording` in `container`, one `.cell` per answer position.
 *
 * Decided cells carry `data-step` (the step that decided them) and the step's colour; cells decided by
 * this very step also get the class `new`; masked cells get the class `masked` and the mask glyph. Cells
 * after the first end token (EOS or end of turn) get the class `past-end`.
 */
export function renderStep(container, recording, step) {
  const frame = recording.frames[step - 1];
  const cells = container.children;
  while (cells.length > frame.tokens.length) container.lastChild.remove();
  while (cells.length < frame.tokens.length) {
    const cell = document.createElement("span");
    cell.dataset.pos = String(cells.length);
    container.append(cell);
  }
  const end = frame.tokens.findIndex((token) => token !== null && END_TOKEN.test(token));
  frame.tokens.forEach((token, pos) => {
    const cell = cells[pos];
    // A cell after an end token never reaches the answer's text, which stops at the first one.
    cell.classList.toggle("past-end", end >= 0 && pos > end);
    if (token === null) {
      cell.classList.remove("decided", "new", "special");
      cell.classList.add("cell", "masked");
      cell.textContent = MASK_GLYPH;
      cell.title = `position ${pos + 1}: masked`;
      delete cell.dataset.step;
      cell.style.backgroundColor = "";
      cell.style.color = "";
      return;
    }
    const decidedAt = recording.stepOf[pos];
    const colour = stepColour(decidedAt, recording.steps);
    cell.classList.remove("masked");
    cell.classList.add("cell", "decided");
    cell.classList.toggle("new", frame.decided.has(pos));
    cell.classList.toggle("special", SPECIAL_TOKEN.test(token));
    cell.dataset.step = String(decidedAt);
    cell.textContent = cellText(token);
    cell.title = `position ${pos + 1}, step ${decidedAt}: ${JSON.stringify(token)}`;
    cell.style.backgroundColor = `rgb(${colour.join(", ")})`;
    cell.style.color = textColour(colour);
  });
}
