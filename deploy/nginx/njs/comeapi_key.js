// The nginx cache key of a generation request: the same normalisation and SHA-256 as
// comeapi.cache.key (NFC, CRLF/CR -> LF, Python's str.strip), computed by njs from the
// request body, so `{"prompt":" Hi\r\n"}` and `{"prompt": "Hi"}` share one cache entry.
//
// js_set $comeapi_cache_key comeapi.cache_key;  ->  "<sha256 of comeapi's key>:<format>"
// or "" when the body is not a request comeapi could cache (nginx then bypasses the cache).
// <format> separates answers whose bytes differ for one prompt: "j" (JSON), "s" (SSE
// stream), "su" (SSE stream with usage). The route ($uri) is added by nginx.conf.

import crypto from 'crypto';
import nfcData from 'nfc_data.js';

const KEY_VERSION = 1;
const DEFAULT_MODEL_VAR = 'comeapi_default_model';
// njs strings count code points; QuickJS (and browsers) count UTF-16 units.
const UTF16 = String.fromCodePoint(0x1F600).length === 2;
// What Python's str.isspace() accepts, hence what str.strip() removes (JavaScript's trim()
// differs: it removes U+FEFF and keeps U+001C..U+001F and U+0085).
const PY_SPACE_RE = /^[\t-\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/;
const PY_SPACE = {};
[0x9, 0xa, 0xb, 0xc, 0xd, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680, 0x2000, 0x2001,
    0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200a, 0x2028, 0x2029,
    0x202f, 0x205f, 0x3000].forEach(function (cp) { PY_SPACE[cp] = true; });

const S_BASE = 0xAC00, L_BASE = 0x1100, V_BASE = 0x1161, T_BASE = 0x11A7;
const L_COUNT = 19, V_COUNT = 21, T_COUNT = 28, N_COUNT = V_COUNT * T_COUNT;
const S_COUNT = L_COUNT * N_COUNT;

function codePoints(s) {
    const out = [];
    for (let i = 0; i < s.length; i++) {
        const cp = s.codePointAt(i);
        out.push(cp);
        if (UTF16 && cp > 0xFFFF) {
            i++;
        }
    }
    return out;
}

function fromCodePoints(cps) {
    let s = '';
    for (let i = 0; i < cps.length; i += 1024) {
        s += String.fromCodePoint.apply(null, cps.slice(i, i + 1024));
    }
    return s;
}

function isFast(cp) {
    const r = nfcData.fast;
    let lo = 0, hi = r.length / 2 - 1;
    while (lo <= hi) {
        const mid = (lo + hi) >> 1;
        if (cp < r[2 * mid]) {
            hi = mid - 1;
        } else if (cp > r[2 * mid + 1]) {
            lo = mid + 1;
        } else {
            return true;
        }
    }
    return false;
}

let tables = null;

// Parsed on first use only: most prompts pass the quick check and never need them.
function nfcTables() {
    if (tables !== null) {
        return tables;
    }
    const ccc = {}, decomp = {}, compose = {};
    nfcData.ccc.split(',').forEach(function (e) {
        const p = e.split(':');
        ccc[parseInt(p[0], 16)] = parseInt(p[1], 16);
    });
    nfcData.decomp.split(',').forEach(function (e) {
        const primary = e.indexOf(':') >= 0;
        const p = e.split(primary ? ':' : '!');
        const cp = parseInt(p[0], 16);
        const m = p[1].split('.').map(function (x) { return parseInt(x, 16); });
        decomp[cp] = m;
        if (primary) {
            compose[m[0] * 0x110000 + m[1]] = cp;
        }
    });
    tables = {ccc: ccc, decomp: decomp, compose: compose};
    return tables;
}

function decompose(cp, t, out) {
    const s = cp - S_BASE;
    if (s >= 0 && s < S_COUNT) {
        out.push(L_BASE + Math.floor(s / N_COUNT));
        out.push(V_BASE + Math.floor((s % N_COUNT) / T_COUNT));
        if (s % T_COUNT) {
            out.push(T_BASE + s % T_COUNT);
        }
        return;
    }
    const m = t.decomp[cp];
    if (m === undefined) {
        out.push(cp);
        return;
    }
    for (let i = 0; i < m.length; i++) {
        decompose(m[i], t, out);
    }
}

function composePair(a, b, t) {
    const l = a - L_BASE, v = b - V_BASE;
    if (l >= 0 && l < L_COUNT && v >= 0 && v < V_COUNT) {
        return S_BASE + (l * V_COUNT + v) * T_COUNT;
    }
    const s = a - S_BASE, tt = b - T_BASE;
    if (s >= 0 && s < S_COUNT && s % T_COUNT === 0 && tt > 0 && tt < T_COUNT) {
        return a + tt;
    }
    return t.compose[a * 0x110000 + b];
}

// Canonical ordering: each run of non-starters sorted stably by combining class. Buckets
// (linear) rather than the usual insertion sort, which a body of 100k combining marks
// would turn into minutes of CPU.
function reorder(d, cls) {
    let i = 0;
    while (i < d.length) {
        if (cls(d[i]) === 0) {
            i++;
            continue;
        }
        let end = i;
        while (end < d.length && cls(d[end]) !== 0) {
            end++;
        }
        if (end - i > 1) {
            const buckets = {}, classes = [];
            for (let k = i; k < end; k++) {
                const c = cls(d[k]);
                if (buckets[c] === undefined) {
                    buckets[c] = [];
                    classes.push(c);
                }
                buckets[c].push(d[k]);
            }
            classes.sort(function (a, b) { return a - b; });
            let k = i;
            classes.forEach(function (c) {
                buckets[c].forEach(function (cp) { d[k++] = cp; });
            });
        }
        i = end;
    }
}

// Unicode NFC (UAX #15): full canonical decomposition, canonical ordering, composition.
function nfc(text) {
    // Quick check (regular expressions run in C): most text, Japanese included, is done here.
    if (nfcData.fastRe.test(text)) {
        return text;
    }
    const cps = codePoints(text);
    if (cps.every(isFast)) {
        return text;
    }
    const t = nfcTables();
    const cls = function (cp) { return t.ccc[cp] || 0; };
    const d = [];
    cps.forEach(function (cp) { decompose(cp, t, d); });
    reorder(d, cls);
    const res = [];
    let starter = -1, lastCls = 0;
    for (let i = 0; i < d.length; i++) {
        const cp = d[i], c = cls(cp);
        if (starter >= 0 && (res.length - 1 === starter || lastCls < c)) {
            const comp = composePair(res[starter], cp, t);
            if (comp !== undefined) {
                res[starter] = comp;
                continue;
            }
        }
        if (c === 0) {
            starter = res.length;
        }
        lastCls = c;
        res.push(cp);
    }
    return fromCodePoints(res);
}

function normalise(text) {
    let s = nfc(text);
    if (s.indexOf('\r') >= 0) {
        s = s.split('\r\n').join('\n').split('\r').join('\n');
    }
    return strip(s);
}

// Python's str.strip(). Leading: one anchored expression; trailing: a loop from the end (an
// expression ending in "+$" backtracks quadratically over long runs of inner spaces).
function strip(s) {
    s = s.replace(PY_SPACE_RE, '');
    let end = s.length;
    while (end > 0 && PY_SPACE[s.codePointAt(end - 1)]) {
        end--;
    }
    return end === s.length ? s : s.slice(0, end);
}

function modelFile(name, r) {
    const wanted = name || r.variables[DEFAULT_MODEL_VAR] || '';
    if (!wanted) {
        return null;
    }
    return wanted.endsWith('.gguf') ? wanted : wanted + '.gguf';
}

function messageText(content) {
    if (typeof content === 'string') {
        return content;
    }
    if (!Array.isArray(content)) {
        return null;
    }
    let text = '';
    for (let i = 0; i < content.length; i++) {
        const part = content[i];
        if (part === null || typeof part !== 'object' || typeof part.text !== 'string') {
            return null;
        }
        text += part.text;
    }
    return text;
}

// comeapi's key document, serialised exactly like json.dumps(sort_keys=True,
// separators=(",", ":"), ensure_ascii=False), or null if the body has no cacheable prompt.
function keyDocument(route, body, r) {
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
        return null;
    }
    const q = JSON.stringify;
    if (route === '/v1/chat/completions') {
        const model = modelFile(typeof body.model === 'string' ? body.model : null, r);
        if (!model || !Array.isArray(body.messages) || body.messages.length === 0) {
            return null;
        }
        const parts = [];
        for (let i = 0; i < body.messages.length; i++) {
            const m = body.messages[i];
            const text = m && typeof m.role === 'string' ? messageText(m.content) : null;
            if (text === null) {
                return null;
            }
            parts.push('[' + q(m.role) + ',' + q(normalise(text)) + ']');
        }
        return '{"messages":[' + parts.join(',') + '],"model":' + q(model)
            + ',"v":' + KEY_VERSION + '}';
    }
    let name = typeof body.model === 'string' ? body.model : null;
    if (route === '/generate' && typeof body.model_name === 'string' && body.model_name) {
        name = body.model_name;
    }
    let prompt = body.prompt;
    if (route === '/v1/completions' && Array.isArray(prompt) && prompt.length === 1) {
        prompt = prompt[0];
    }
    const model = modelFile(name, r);
    const text = typeof prompt === 'string' ? normalise(prompt) : '';
    if (!text || !model) {
        return null;
    }
    return '{"model":' + q(model) + ',"prompt":' + q(text) + ',"v":' + KEY_VERSION + '}';
}

function responseFormat(body) {
    if (body.stream !== true) {
        return 'j';
    }
    const opts = body.stream_options;
    return opts && typeof opts === 'object' && opts.include_usage === true ? 'su' : 's';
}

function parsedBody(r) {
    const text = r.requestText;
    if (typeof text !== 'string') {
        // Only when the body went to a temporary file: client_body_buffer_size must equal
        // client_max_body_size. Never guess a key from a body we cannot see.
        r.warn('comeapi: request body not in memory, cache bypassed');
        return null;
    }
    try {
        return JSON.parse(text);
    } catch (e) {
        return null;
    }
}

function digest(doc) {
    return crypto.createHash('sha256').update(doc).digest('hex');
}

// js_set handler: "" means "do not cache" (proxy_cache_bypass / proxy_no_cache).
function cache_key(r) {
    if (r.method !== 'POST') {
        return '';
    }
    const body = parsedBody(r);
    const doc = keyDocument(r.uri, body, r);
    return doc === null ? '' : digest(doc) + ':' + responseFormat(body);
}

// js_content handler for the internal listener: which key nginx computes for a body.
function show_key(r) {
    const body = parsedBody(r);
    const route = r.args.route || '/generate';
    const doc = keyDocument(route, body, r);
    const out = {
        key: doc === null ? null : digest(doc),
        format: doc === null ? null : responseFormat(body),
        document: doc,
        unicode: nfcData.unicode,
    };
    r.headersOut['Content-Type'] = 'application/json';
    r.return(doc === null ? 422 : 200, JSON.stringify(out) + '\n');
}

export default {cache_key, show_key, normalise, nfc, keyDocument};
