// nginx's front door for the generation routes, line for line what comeapi does: the request
// is validated as comeapi.protocol.requests validates it (400 with the same `param`), then
// keyed as comeapi.cache.key keys it (NFC, CRLF/CR -> LF, Python's str.strip, SHA-256), so
// `{"prompt":" Hi\r\n"}` and `{"prompt": "Hi"}` share one cache entry and a body is invalid
// in nginx exactly when it is invalid in comeapi. tests/conformance runs one table against
// both.
//
// js_content comeapi.front_door;  sets js_var $comeapi_cache_key to
// "<sha256 of comeapi's key>:<format>", or "" when no stored answer fits the request (nginx
// then bypasses the cache). <format> separates answers whose bytes differ for one prompt:
// "j" (JSON), "s" (SSE stream), "su" (SSE stream with usage). The route ($uri) is added by
// comeapi-locations.conf.

import crypto from 'crypto';
import nfcData from 'nfc_data.js';

const KEY_VERSION = 1;
const DEFAULT_MODEL_VAR = 'comeapi_default_model';
const MAX_TOKENS_VAR = 'comeapi_max_tokens_limit';
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

// More than 30 combining marks in a row (UAX #15's stream-safe limit) in text that is not
// already NFC: refused, as comeapi.cache.key refuses it (CPython's NFC is quadratic there).
const MAX_COMBINING_RUN = 30;

function checkStreamSafe(text) {
    const t = nfcTables();
    let run = 0;
    codePoints(text).forEach(function (cp) {
        run = t.ccc[cp] ? run + 1 : 0;
        if (run > MAX_COMBINING_RUN) {
            fail('prompt', 'the prompt has more than ' + MAX_COMBINING_RUN
                + ' combining marks in a row', 'invalid_unicode');
        }
    });
}

function normalise(text) {
    let s = nfc(text);
    if (s !== text) {
        checkStreamSafe(text);
    }
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

// --- the front door: src/comeapi/protocol/requests.py, line for line ---------------------
// Fields are checked in the same order as there, so both name the same `param`; the same
// table (tests/conformance/requests.jsonl) runs against both.

const ROLES = {system: 1, developer: 1, user: 1, assistant: 1};
const MEDIA_PARTS = {image_url: 1, input_audio: 1, file: 1, refusal: 1};
const PART_TYPES = 'file, image_url, input_audio, refusal, text';
const RESPONSE_FORMATS = {text: 1, json_object: 1, json_schema: 1};
const MAX_STOP = 4, MAX_N = 16, MAX_PROMPTS = 16, MAX_TOP_LOGPROBS = 20;
const MAX_LOGIT_BIAS = 1024, SEED_MAX = 4294967295, TOP_K_MAX = 2147483647;

function RequestError(param, message, code) {
    this.param = param;
    this.message = param === null ? message : param + ': ' + message;
    this.code = code || 'invalid_value';
}

function fail(param, message, code) {
    throw new RequestError(param, message, code);
}

function has(obj, name) {
    return obj[name] !== undefined && obj[name] !== null;
}

function isObject(v) {
    return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function jsonType(v) {
    if (v === null || v === undefined) {
        return 'null';
    }
    if (typeof v === 'boolean') {
        return 'a boolean';
    }
    if (typeof v === 'number') {
        return 'a number';
    }
    if (typeof v === 'string') {
        return 'a string';
    }
    return Array.isArray(v) ? 'a list' : 'an object';
}

function number(body, name, dflt, lo, hi) {
    if (!has(body, name)) {
        return dflt;
    }
    const v = body[name];
    if (typeof v !== 'number') {
        fail(name, 'must be a number, got ' + jsonType(v));
    }
    if (!(v >= lo && v <= hi)) {
        fail(name, 'must be between ' + lo + ' and ' + hi);
    }
    return v;
}

function integer(body, name, dflt, lo, hi, prefix) {
    const param = (prefix || '') + name;
    if (!has(body, name)) {
        return dflt;
    }
    const v = body[name];
    if (typeof v !== 'number' || !Number.isInteger(v)) {
        fail(param, 'must be an integer, got ' + jsonType(v));
    }
    if (v < lo || (hi !== null && v > hi)) {
        fail(param, hi !== null ? 'must be between ' + lo + ' and ' + hi : 'must be at least ' + lo);
    }
    return v;
}

function positive(body, name, dflt) {
    return has(body, name) ? integer(body, name, 1, 1, null) : dflt;
}

function flag(body, name, prefix) {
    if (!has(body, name)) {
        return false;
    }
    if (typeof body[name] !== 'boolean') {
        fail((prefix || '') + name, 'must be true or false, got ' + jsonType(body[name]));
    }
    return body[name];
}

function seed(body) {
    return has(body, 'seed') ? integer(body, 'seed', 0, 0, SEED_MAX) : null;
}

function model(body, name) {
    if (!has(body, name)) {
        return null;
    }
    if (typeof body[name] !== 'string') {
        fail(name, 'must be a string, got ' + jsonType(body[name]));
    }
    return body[name] || null;
}

function nonblank(text, param) {
    if (strip(text) === '') {
        fail(param, 'must not be empty');
    }
    return text;
}

function stop(body) {
    if (!has(body, 'stop')) {
        return;
    }
    const v = body.stop;
    const stops = typeof v === 'string' ? [v] : v;
    if (!Array.isArray(stops) || !stops.every(function (s) { return typeof s === 'string'; })) {
        fail('stop', 'must be a string or a list of strings');
    }
    if (stops.length > MAX_STOP || !stops.every(function (s) { return s.length > 0; })) {
        fail('stop', 'takes at most ' + MAX_STOP + ' non-empty strings');
    }
}

function prompts(v) {
    if (typeof v === 'string') {
        return [nonblank(v, 'prompt')];
    }
    if (!Array.isArray(v) || v.length === 0) {
        fail('prompt', 'is required: a string or a non-empty list of strings');
    }
    if (!v.every(function (p) { return typeof p === 'string'; })) {
        if (v.every(function (p) { return typeof p === 'number' && Number.isInteger(p); })
            || v.every(Array.isArray)) {
            fail('prompt', 'token-id prompts are not supported; send text');
        }
        fail('prompt', 'must be a string or a list of strings');
    }
    if (v.length > MAX_PROMPTS) {
        fail('prompt', 'takes at most ' + MAX_PROMPTS + ' prompts');
    }
    v.forEach(function (p, i) { nonblank(p, 'prompt.' + i); });
    return v;
}

function message(v, i) {
    const where = 'messages.' + i;
    if (!isObject(v)) {
        fail(where, 'must be an object with role and content');
    }
    if (typeof v.role !== 'string' || !ROLES[v.role]) {
        fail(where + '.role', 'must be one of assistant, developer, system, user');
    }
    if (has(v, 'name') && typeof v.name !== 'string') {
        fail(where + '.name', 'must be a string');
    }
    if (has(v, 'tool_calls')) {
        fail(where + '.tool_calls', 'tool calls are not supported');
    }
    const content = v.content;
    if (typeof content === 'string') {
        return {role: v.role, content: content, media: 0};
    }
    if (!Array.isArray(content)) {
        fail(where + '.content', 'must be a string or a list of content parts');
    }
    let text = '', media = 0;
    for (let j = 0; j < content.length; j++) {
        const at = where + '.content.' + j, part = content[j];
        const kind = isObject(part) && typeof part.type === 'string' ? part.type : null;
        if (kind === 'text') {
            if (typeof part.text !== 'string') {
                fail(at + '.text', 'must be a string, got ' + jsonType(part.text));
            }
            text += part.text;
        } else if (kind !== null && MEDIA_PARTS[kind]) {
            const ok = kind === 'refusal' ? typeof part[kind] === 'string' : isObject(part[kind]);
            if (!ok) {
                fail(at + '.' + kind, 'a ' + kind + ' part needs its ' + kind + ' field');
            }
            media++;
        } else if (isObject(part)) {
            fail(at + '.type', 'must be one of ' + PART_TYPES);
        } else {
            fail(at, 'must be an object with a type');
        }
    }
    return {role: v.role, content: text, media: media};
}

function logitBias(v) {
    if (v === undefined || v === null) {
        return 0;
    }
    if (!isObject(v)) {
        fail('logit_bias', 'must be an object mapping token ids to numbers');
    }
    const tokens = Object.keys(v);
    if (tokens.length > MAX_LOGIT_BIAS) {
        fail('logit_bias', 'takes at most ' + MAX_LOGIT_BIAS + ' tokens');
    }
    tokens.forEach(function (t) {
        if (!/^[0-9]{1,9}$/.test(t)) {
            fail('logit_bias', 'keys must be token ids');
        }
        const b = v[t];
        if (typeof b !== 'number' || !(b >= -100 && b <= 100)) {
            fail('logit_bias', t + ': the bias must be a number in -100..100');
        }
    });
    return tokens.length;
}

function responseFormat(v) {
    if (v === undefined || v === null) {
        return null;
    }
    const kind = isObject(v) && typeof v.type === 'string' ? v.type : null;
    if (kind === null || !RESPONSE_FORMATS[kind]) {
        fail('response_format.type', 'must be one of json_object, json_schema, text');
    }
    if (kind === 'text') {
        return null;
    }
    if (kind === 'json_object' && has(v, 'schema') && !isObject(v.schema)) {
        fail('response_format.schema', 'must be a JSON Schema object');
    }
    if (kind === 'json_schema') {
        const spec = v.json_schema;
        if (!isObject(spec)) {
            fail('response_format.json_schema', 'is required for type json_schema');
        }
        if (typeof spec.name !== 'string' || spec.name === '') {
            fail('response_format.json_schema.name', 'is required: a non-empty string');
        }
        if (has(spec, 'schema') && !isObject(spec.schema)) {
            fail('response_format.json_schema.schema', 'must be a JSON Schema object');
        }
        flag(spec, 'strict', 'response_format.json_schema.');
    }
    return kind;
}

// response_format, or llama-server's grammar (GBNF; "" is none) and top-level json_schema:
// at most one. The field that asks for a format, or null.
function outputFormat(body) {
    let chosen = responseFormat(body.response_format) === null ? null : 'response_format';
    if (has(body, 'grammar') && typeof body.grammar !== 'string') {
        fail('grammar', 'must be a string (a GBNF grammar), got ' + jsonType(body.grammar));
    }
    if (has(body, 'grammar') && body.grammar !== '') {
        chosen = only(chosen, 'grammar');
    }
    if (has(body, 'json_schema')) {
        if (!isObject(body.json_schema)) {
            fail('json_schema', 'must be a JSON Schema object, got ' + jsonType(body.json_schema));
        }
        chosen = only(chosen, 'json_schema');
    }
    return chosen;
}

function only(chosen, field) {
    if (chosen !== null) {
        fail(field, 'cannot be combined with ' + chosen + ': send one of them');
    }
    return field;
}

function tools(v) {
    if (v === undefined || v === null) {
        return 0;
    }
    if (!Array.isArray(v) || !v.every(isObject)) {
        fail('tools', 'must be a list of tool objects');
    }
    return v.length;
}

function toolChoice(v) {
    if (v === undefined || v === null || isObject(v)
        || v === 'none' || v === 'auto' || v === 'required') {
        return v === undefined ? null : v;
    }
    fail('tool_choice', 'must be "none", "auto", "required" or an object');
}

function openaiCommon(body, req) {
    number(body, 'temperature', 1, 0, 2);
    number(body, 'top_p', 1, 0, 1);
    integer(body, 'top_k', 40, 0, TOP_K_MAX);
    seed(body);
    stop(body);
    req.stream = flag(body, 'stream');
    const options = body.stream_options;
    if (has(body, 'stream_options') && !isObject(options)) {
        fail('stream_options', 'must be an object');
    }
    req.includeUsage = has(body, 'stream_options') && flag(options, 'include_usage',
        'stream_options.');
    if (has(body, 'user') && typeof body.user !== 'string') {
        fail('user', 'must be a string');
    }
    req.n = integer(body, 'n', 1, 1, MAX_N);
    req.logitBias = logitBias(body.logit_bias);
    number(body, 'presence_penalty', 0, -2, 2);
    number(body, 'frequency_penalty', 0, -2, 2);
}

function parseGenerate(body, req) {
    if (typeof body.prompt !== 'string') {
        fail('prompt', 'is required and must be a string');
    }
    req.prompts = [nonblank(body.prompt, 'prompt')];
    req.model = model(body, 'model_name');
    if (req.model === null) {
        req.model = model(body, 'model');
    }
    req.maxTokens = positive(body, 'max_tokens', 100);
    number(body, 'temperature', 0.8, 0, 2);
    integer(body, 'top_k', 40, 0, TOP_K_MAX);
    number(body, 'top_p', 0.9, 0, 1);
    seed(body);
    stop(body);
    req.stream = flag(body, 'stream');
}

function parseCompletion(body, req) {
    // OpenAI's null prompt: a new document's start, "" (valid, never a hit); missing: 400.
    req.prompts = body.prompt === null ? [''] : prompts(body.prompt);
    req.model = model(body, 'model');
    req.maxTokens = positive(body, 'max_tokens', 16);
    req.logprobs = has(body, 'logprobs');
    integer(body, 'logprobs', 0, 0, MAX_TOP_LOGPROBS);
    req.echo = flag(body, 'echo');
    req.responseFormat = outputFormat(body);
    openaiCommon(body, req);
}

function parseChat(body, req) {
    if (!Array.isArray(body.messages) || body.messages.length === 0) {
        fail('messages', 'is required and must be a non-empty list of messages');
    }
    req.messages = body.messages.map(message);
    req.model = model(body, 'model');
    const maxCompletion = positive(body, 'max_completion_tokens', null);
    const maxTokens = positive(body, 'max_tokens', null);
    req.maxTokens = maxCompletion !== null ? maxCompletion : maxTokens;
    req.logprobs = flag(body, 'logprobs');
    integer(body, 'top_logprobs', 0, 0, MAX_TOP_LOGPROBS);
    if (has(body, 'top_logprobs') && !req.logprobs) {
        fail('top_logprobs', 'needs logprobs: true');
    }
    ['functions', 'function_call'].forEach(function (name) {
        if (has(body, name)) {
            fail(name, 'is deprecated and not supported; use tools');
        }
    });
    if (has(body, 'audio')) {
        fail('audio', 'is not supported: this server answers with text only');
    }
    const m = body.modalities;
    if (has(body, 'modalities') && !(Array.isArray(m) && m.length === 1 && m[0] === 'text')) {
        fail('modalities', 'only ["text"] is supported');
    }
    if (has(body, 'web_search_options')) {
        fail('web_search_options', 'is not supported: this server has no web search');
    }
    req.responseFormat = outputFormat(body);
    req.tools = tools(body.tools);
    req.toolChoice = toolChoice(body.tool_choice);
    openaiCommon(body, req);
}

const PARSERS = {
    '/generate': parseGenerate,
    '/v1/completions': parseCompletion,
    '/v1/chat/completions': parseChat,
    '/completions': parseCompletion,
    '/chat/completions': parseChat,
};

// The validated request (what the key and the response format need), or a RequestError.
function parseRequest(route, body, maxTokensLimit) {
    if (!isObject(body)) {
        fail(null, 'request body must be a JSON object', 'invalid_json');
    }
    const req = {
        prompts: [], messages: null, model: null, maxTokens: null, stream: false,
        includeUsage: false, n: 1, logprobs: false, logitBias: 0, responseFormat: null,
        echo: false, tools: 0, toolChoice: null,
    };
    PARSERS[route](body, req);
    if (req.maxTokens !== null && req.maxTokens > maxTokensLimit) {
        fail('max_tokens', req.maxTokens + " is above this server's limit of " + maxTokensLimit);
    }
    return req;
}

// comeapi.cache.key.uncacheable: the field a stored answer cannot satisfy, or null.
function uncacheable(req) {
    if (req.messages !== null) {
        for (let i = 0; i < req.messages.length; i++) {
            if (req.messages[i].media) {
                return 'messages.' + i + '.content';
            }
        }
    }
    if (req.prompts.length > 1 || req.prompts[0] === '') {
        return 'prompt';
    }
    if (req.n > 1) {
        return 'n';
    }
    if (req.logprobs) {
        return 'logprobs';
    }
    if (req.logitBias) {
        return 'logit_bias';
    }
    if (req.responseFormat !== null) {
        return req.responseFormat;  // response_format, grammar or json_schema
    }
    if (req.echo) {
        return 'echo';
    }
    if (req.tools && req.toolChoice !== 'none') {
        return 'tools';
    }
    return null;
}

function canonicalModel(name) {
    return name.endsWith('.gguf') ? name : name + '.gguf';
}

// comeapi's key document, serialised exactly like json.dumps(sort_keys=True,
// separators=(",", ":"), ensure_ascii=False).
function keyDocument(req, defaultModel) {
    const q = JSON.stringify;
    const name = canonicalModel(req.model || defaultModel);
    if (req.messages !== null) {
        const parts = req.messages.map(function (m) {
            return '[' + q(m.role) + ',' + q(normalise(m.content)) + ']';
        });
        return '{"messages":[' + parts.join(',') + '],"model":' + q(name)
            + ',"v":' + KEY_VERSION + '}';
    }
    return '{"model":' + q(name) + ',"prompt":' + q(normalise(req.prompts[0]))
        + ',"v":' + KEY_VERSION + '}';
}

// The cache entries of one prompt differ by the bytes of the answer: "j" (JSON), "s" (SSE
// stream), "su" (SSE stream with usage).
function answerFormat(req) {
    if (!req.stream) {
        return 'j';
    }
    return req.includeUsage ? 'su' : 's';
}

// JSON as strict as comeapi's orjson: valid UTF-8 (TextDecoder, fatal), no byte order mark
// (ignoreBOM keeps it for JSON.parse to refuse), no number beyond a double, no lone
// surrogate escape (JSON.parse would turn it into U+FFFD), no number JSON forbids.
const UTF8 = new TextDecoder('utf-8', {fatal: true, ignoreBOM: true});

// njs's JSON.parse reads numbers JSON forbids (and orjson refuses): a leading zero (01, -01,
// 00), a dot with no digit before it (.5, -.5) or after it (1., 1.e5). LAX_NUMBER finds one
// anywhere; only when it does (prose like "Step 1." in a prompt) is the text looked at again
// without its strings. Linear on purpose: a global regular expression costs O(length) per
// match in njs (stripping 100,000 strings with one took 67 s), split and join run in C.
// Lookbehinds rather than (?:^|[^0-9]): PCRE then only tries where a "-", "0" or "." starts,
// a quarter of the cost per body (10,000 tests of a 110-byte chat body).
const LAX_NUMBER = /(?<![0-9.eE+\-])-?0[0-9]|(?<![0-9])\.[0-9]|(?<=[0-9])\.(?![0-9])/;

function laxNumber(text) {
    return LAX_NUMBER.test(text) && LAX_NUMBER.test(outsideStrings(text));
}

// The text between strings, each string written "". Escaped backslashes, then escaped quotes
// out first: every quote left opens or closes a string.
function outsideStrings(text) {
    const plain = text.indexOf('\\') < 0 ? text
        : text.split('\\\\').join('').split('\\"').join('');
    const pieces = plain.split('"');
    const outside = [];
    for (let i = 0; i < pieces.length; i += 2) {
        outside.push(pieces[i]);
    }
    return outside.join('""');
}

function finiteNumbers(key, value) {
    if (typeof value === 'number' && !isFinite(value)) {
        throw new SyntaxError('number out of range');
    }
    return value;
}

// A \uD800-\uDFFF escape that is not half of a high-low pair. A plain scan: a global regular
// expression costs O(length) per match in njs, so 20,000 escaped emoji took 15 s.
function loneSurrogateEscape(text) {
    let pendingHighEnd = -1;
    for (let i = text.indexOf('\\u'); i >= 0; i = text.indexOf('\\u', i + 2)) {
        let start = i;
        while (start > 0 && text.charCodeAt(start - 1) === 0x5C) {
            start--;
        }
        if ((i - start) % 2 === 1) {
            continue;  // an escaped backslash followed by the letter u
        }
        const code = parseInt(text.substring(i + 2, i + 6), 16);
        if (code >= 0xD800 && code < 0xDC00) {
            if (pendingHighEnd >= 0) {
                return true;
            }
            pendingHighEnd = i + 6;
        } else if (code >= 0xDC00 && code < 0xE000) {
            if (pendingHighEnd !== i) {
                return true;
            }
            pendingHighEnd = -1;
        }
    }
    return pendingHighEnd >= 0;
}

function decodeBody(buffer) {
    try {
        const text = buffer === undefined ? '' : UTF8.decode(buffer);
        if (text.indexOf('\\u') >= 0 && loneSurrogateEscape(text)) {
            throw new SyntaxError('lone surrogate escape');
        }
        if (laxNumber(text)) {
            throw new SyntaxError('a number with a leading zero or a bare decimal point');
        }
        // Nesting: njs's JSON.parse reads at most 31 levels (NJS_JSON_MAX_DEPTH 32, while it
        // reads: a deep value a later duplicate key replaces counts too), which is
        // comeapi.protocol.json_body's MAX_DEPTH; the conformance table checks both.
        return {body: JSON.parse(text, finiteNumbers)};
    } catch (e) {
        return {error: new RequestError(null, 'request body is not valid JSON: ' + e.message,
            'invalid_json')};
    }
}

// One verdict for a request body: {error}, {uncacheable: param}, or {key, format, document}.
function verdict(route, buffer, r) {
    const decoded = decodeBody(buffer);
    if (decoded.error) {
        return {error: decoded.error};
    }
    const limit = parseInt(r.variables[MAX_TOKENS_VAR] || '2048', 10);
    try {
        const req = parseRequest(route, decoded.body, limit);
        const blocker = uncacheable(req);
        if (blocker !== null) {
            return {uncacheable: blocker};
        }
        const doc = keyDocument(req, r.variables[DEFAULT_MODEL_VAR] || '');
        return {key: digest(doc), format: answerFormat(req), document: doc};
    } catch (e) {
        if (e instanceof RequestError) {
            return {error: e};
        }
        throw e;
    }
}

function errorBody(e) {
    return JSON.stringify({error: {message: e.message, type: 'invalid_request_error',
        param: e.param, code: e.code}});
}

// The body as nginx holds it, or null when it went to a temporary file (only if
// client_body_buffer_size were smaller than client_max_body_size): then comeapi decides.
function requestBody(r) {
    let buffer;
    try {
        buffer = r.requestBuffer;
    } catch (e) {
        buffer = undefined;  // njs: "request body is in a file"
    }
    if (buffer === undefined && r.headersIn['Content-Length'] > 0) {
        r.warn('comeapi: request body not in memory, cache bypassed');
        return null;
    }
    return buffer;
}

function digest(doc) {
    return crypto.createHash('sha256').update(doc).digest('hex');
}

// js_content handler of the generation routes: nginx reads the body, answers 400 itself for
// a request comeapi would refuse (so that comeapi may be stopped), and otherwise sets
// $comeapi_cache_key (js_var: "<key>:<format>", or "" for "do not cache": a body no stored
// answer fits) and goes on to the cached proxy in the named location.
function front_door(r) {
    const body = r.method === 'POST' ? requestBody(r) : null;
    const v = body === null ? {} : verdict(r.uri, body, r);
    if (v.error) {
        r.headersOut['Content-Type'] = 'application/json';
        r.return(400, errorBody(v.error) + '\n');
        return;
    }
    r.variables.comeapi_cache_key = v.key ? v.key + ':' + v.format : '';
    r.internalRedirect('@comeapi_generation');
}

// js_content handler for the internal listener: nginx's verdict on a body.
function show_key(r) {
    const route = r.args.route || '/generate';
    const body = requestBody(r);
    const v = body === null ? {} : verdict(route, body, r);
    const out = {
        key: v.key || null,
        format: v.format || null,
        document: v.document || null,
        uncacheable: v.uncacheable || null,
        error: v.error ? JSON.parse(errorBody(v.error)).error : null,
        unicode: nfcData.unicode,
    };
    r.headersOut['Content-Type'] = 'application/json';
    r.return(200, JSON.stringify(out) + '\n');
}

export default {front_door, show_key, normalise, nfc, verdict};
