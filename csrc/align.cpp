// tokdistill_fast._align_ext: the alignment builder of tokdistill_fast/align.py (align_py is the specification)
// on flat int64 buffers in the cu_seqlens layout. Plain pybind11, no libtorch: builds in seconds, no torch ABI.
//
// Snippet i (teacher ids t = teacher_ids[cu_teacher[i]:cu_teacher[i+1]]) merges every greedy left-to-right
// occurrence of its phrase p = snippet_phrase[i] into phrase_new_id[p]; aligned pairs run from the first merged
// student position to the end, the new token pairing with the last subtoken of its phrase.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

using i64 = std::int64_t;
using i32 = std::int32_t;
// Accepts int64 arrays as they are (no copy) and safely castable ones (int32, lists) by conversion.
using InArray = py::array_t<i64, py::array::c_style>;

// `fn` names the function in messages, as the Python spec's messages do.
[[noreturn]] void fail(const std::string& msg, const char* fn = "align") {
  throw py::value_error(std::string(fn) + ": " + msg);
}

const i64* data_1d(const InArray& a, const char* name, const char* fn = "align") {
  if (a.ndim() != 1) fail(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) + " dimensions", fn);
  return a.data();
}

// cu must be a cu_seqlens array over `total` values: cu[0] == 0, non-decreasing, cu[-1] == total.
// Returns the longest sequence. (Messages are built only on failure: this runs once per snippet.)
i64 check_cu(const i64* cu, i64 len, i64 total, const char* name, const char* values) {
  if (len < 1) fail(std::string(name) + " must hold at least one offset (0)");
  if (cu[0] != 0) fail(std::string(name) + "[0] must be 0, got " + std::to_string(cu[0]));
  i64 longest = 0;
  for (i64 i = 0; i + 1 < len; ++i) {
    if (cu[i + 1] < cu[i])
      fail(std::string(name) + " must be non-decreasing: " + name + "[" + std::to_string(i + 1) +
           "] = " + std::to_string(cu[i + 1]) + " < " + std::to_string(cu[i]));
    if (cu[i + 1] - cu[i] > longest) longest = cu[i + 1] - cu[i];
  }
  if (cu[len - 1] != total)
    fail(std::string(name) + "[-1] = " + std::to_string(cu[len - 1]) + " but " + values + " holds " +
         std::to_string(total) + " values");
  return longest;
}

py::tuple align(const InArray& teacher_ids, const InArray& cu_teacher, const InArray& phrase_ids,
                const InArray& cu_phrase, const InArray& snippet_phrase, const InArray& phrase_new_id) {
  const i64* t = data_1d(teacher_ids, "teacher_ids");
  const i64* cu_t = data_1d(cu_teacher, "cu_teacher");
  const i64* ph = data_1d(phrase_ids, "phrase_ids");
  const i64* cu_p = data_1d(cu_phrase, "cu_phrase");
  const i64* sp = data_1d(snippet_phrase, "snippet_phrase");
  const i64* new_id = data_1d(phrase_new_id, "phrase_new_id");

  const i64 N = teacher_ids.shape(0), n = cu_teacher.shape(0) - 1, m = cu_phrase.shape(0) - 1;
  const i64 longest = check_cu(cu_t, n + 1, N, "cu_teacher", "teacher_ids");
  check_cu(cu_p, m + 1, phrase_ids.shape(0), "cu_phrase", "phrase_ids");
  // Positions are int32 (what the kernels index with).
  if (longest > std::numeric_limits<i32>::max())
    fail("a teacher sequence of " + std::to_string(longest) + " ids does not fit int32 positions");
  if (snippet_phrase.shape(0) != n)
    fail("snippet_phrase has " + std::to_string(snippet_phrase.shape(0)) + " entries for " + std::to_string(n) +
         " snippets");
  if (phrase_new_id.shape(0) != m)
    fail("phrase_new_id has " + std::to_string(phrase_new_id.shape(0)) + " entries for " + std::to_string(m) +
         " phrases");
  for (i64 i = 0; i < n; ++i)
    if (sp[i] < 0 || sp[i] >= m)
      fail("snippet_phrase[" + std::to_string(i) + "] = " + std::to_string(sp[i]) + " is not a phrase index in [0, " +
           std::to_string(m) + ")");

  // One pass: find the next greedy match, copy the run of teacher ids before it, write the new id. Outputs are
  // numpy arrays sized by upper bounds (merging only shortens; each student position is paired at most once),
  // allocated with the GIL held, filled without it and returned as views of their used part. The slack is
  // mostly address space (pages never written are never committed); sizing exactly took a second pass.
  py::array_t<i64> student(N), cu_student(n + 1), cu_aligned(n + 1);
  py::array_t<i32> s_pos(N), t_pos(N);
  i64* out = student.mutable_data();
  i64* cu_s = cu_student.mutable_data();
  i64* cu_a = cu_aligned.mutable_data();
  i32* const sp_begin = s_pos.mutable_data();
  i32* so = sp_begin;
  i32* to = t_pos.mutable_data();
  {
    py::gil_scoped_release nogil;
    cu_s[0] = cu_a[0] = 0;
    for (i64 i = 0; i < n; ++i) {
      const i64* seq = t + cu_t[i];
      const i64 len = cu_t[i + 1] - cu_t[i];
      const i64* phrase = ph + cu_p[sp[i]];
      const i64 plen = cu_p[sp[i] + 1] - cu_p[sp[i]];
      i64* o = out + cu_s[i];
      const i64 last = plen > 0 ? len - plen : -1;  // the last position a match can start at (none if empty)
      i64 j = 0, s = 0;                              // teacher and student position
      bool paired = false;                           // pairs start at the first merge
      while (j < len) {
        i64 q = j;  // the next position where the phrase matches, or len
        while (q <= last && !(seq[q] == phrase[0] && std::equal(phrase + 1, phrase + plen, seq + q + 1))) ++q;
        if (q > last) q = len;
        std::copy(seq + j, seq + q, o + s);
        if (paired)
          for (i64 k = 0; k < q - j; ++k) {
            *so++ = static_cast<i32>(s + k);
            *to++ = static_cast<i32>(j + k);
          }
        s += q - j;
        if (q == len) break;
        o[s] = new_id[sp[i]];
        *so++ = static_cast<i32>(s);
        *to++ = static_cast<i32>(q + plen - 1);
        ++s;
        j = q + plen;
        paired = true;
      }
      cu_s[i + 1] = cu_s[i] + s;
      cu_a[i + 1] = so - sp_begin;
    }
  }
  auto used = [](auto& a, i64 size) {  // a view of a[:size] that keeps `a` alive
    using T = typename std::remove_reference_t<decltype(a)>::value_type;
    return py::array_t<T>(size, a.data(), a);
  };
  return py::make_tuple(used(student, cu_s[n]), cu_student, used(s_pos, cu_a[n]), used(t_pos, cu_a[n]), cu_aligned);
}

// Cross-tokenization alignment (tokdistill_fast/align.py, cross_align_py is the specification): pairs of positions
// where teacher and student sequences of the same text end at the same character offset, at boundaries (the last of
// the tokens sharing an end offset), from the first difference on and never at position 0 (the attention sink).
py::tuple cross_align(const InArray& teacher_ids, const InArray& cu_teacher, const InArray& teacher_ends,
                      const InArray& student_ids, const InArray& cu_student, const InArray& student_ends) {
  auto cfail = [](const std::string& msg) { fail(msg, "cross_align"); };
  auto one_d = [](const InArray& a, const char* name) { return data_1d(a, name, "cross_align"); };
  const i64* t = one_d(teacher_ids, "teacher_ids");
  const i64* cu_t = one_d(cu_teacher, "cu_teacher");
  const i64* te = one_d(teacher_ends, "teacher_ends");
  const i64* s = one_d(student_ids, "student_ids");
  const i64* cu_s = one_d(cu_student, "cu_student");
  const i64* se = one_d(student_ends, "student_ends");
  const i64 Nt = teacher_ids.shape(0), Ns = student_ids.shape(0);
  i64 longest = 0;
  for (int side = 0; side < 2; ++side) {
    const std::string name = side ? "student" : "teacher";
    const i64* cu = side ? cu_s : cu_t;
    const i64 len = side ? cu_student.shape(0) : cu_teacher.shape(0), total = side ? Ns : Nt;
    bool ok = len > 0 && cu[0] == 0 && cu[len - 1] == total;
    for (i64 i = 0; ok && i + 1 < len; ++i) {
      ok = cu[i + 1] >= cu[i];
      longest = std::max(longest, cu[i + 1] - cu[i]);
    }
    if (!ok)
      cfail("cu_" + name + " must run from 0 to len(" + name + "_ids) = " + std::to_string(total) +
            " without decreasing");
    if ((side ? student_ends.shape(0) : teacher_ends.shape(0)) != total)
      cfail(name + "_ends needs one offset per id (" + std::to_string(total) + "), got " +
            std::to_string(side ? student_ends.shape(0) : teacher_ends.shape(0)));
  }
  const i64 n = cu_teacher.shape(0) - 1;
  if (cu_student.shape(0) - 1 != n)
    cfail(std::to_string(n) + " teacher snippets but " + std::to_string(cu_student.shape(0) - 1) +
          " student snippets");
  for (int side = 0; side < 2; ++side) {
    const i64* cu = side ? cu_s : cu_t;
    const i64* ends = side ? se : te;
    for (i64 i = 0; i < n; ++i)
      for (i64 k = cu[i] + 1; k < cu[i + 1]; ++k)
        if (ends[k] < ends[k - 1])
          cfail(std::string(side ? "student" : "teacher") + "_ends must not decrease inside a snippet");
  }
  // Positions are int32 (what the kernels index with).
  if (longest > std::numeric_limits<i32>::max())
    cfail("a sequence of " + std::to_string(longest) + " ids does not fit int32 positions");

  // At most one pair per student position: outputs sized by Ns, returned as views of their used part (as align).
  py::array_t<i32> s_pos(Ns), t_pos(Ns);
  py::array_t<i64> cu_aligned(n + 1);
  i32* const so_begin = s_pos.mutable_data();
  i32* so = so_begin;
  i32* to = t_pos.mutable_data();
  i64* cu_a = cu_aligned.mutable_data();
  {
    py::gil_scoped_release nogil;
    cu_a[0] = 0;
    for (i64 i = 0; i < n; ++i) {
      const i64 *ti = t + cu_t[i], *tei = te + cu_t[i], *si = s + cu_s[i], *sei = se + cu_s[i];
      const i64 lt = cu_t[i + 1] - cu_t[i], ls = cu_s[i + 1] - cu_s[i];
      i64 d = 0;
      while (d < lt && d < ls && ti[d] == si[d] && tei[d] == sei[d]) ++d;
      if (!(d == lt && d == ls)) {
        i64 a = std::max<i64>(d, 1), b = a;
        while (a < lt && b < ls) {
          if (a + 1 < lt && tei[a + 1] == tei[a]) {
            ++a;
          } else if (b + 1 < ls && sei[b + 1] == sei[b]) {
            ++b;
          } else if (tei[a] == sei[b]) {
            *so++ = static_cast<i32>(b++);
            *to++ = static_cast<i32>(a++);
          } else if (tei[a] < sei[b]) {
            ++a;
          } else {
            ++b;
          }
        }
      }
      cu_a[i + 1] = so - so_begin;
    }
  }
  const i64 K = cu_a[n];
  return py::make_tuple(py::array_t<i32>(K, s_pos.data(), s_pos), py::array_t<i32>(K, t_pos.data(), t_pos),
                        cu_aligned);
}

// Python sequences of ints (lists of lists, as the pipeline builds them) -> (values int64, cu_seqlens int64).
// Reads the int objects directly: about 4x faster than numpy.fromiter, which otherwise dominated the cpp path.
py::tuple pack(const py::handle& seqs) {
  auto fast = [](PyObject* o, const char* what) {
    auto f = py::reinterpret_steal<py::object>(PySequence_Fast(o, what));
    if (!f) throw py::error_already_set();
    return f;
  };
  py::object outer = fast(seqs.ptr(), "pack: expected a sequence of sequences of ints");
  const py::ssize_t n = PySequence_Fast_GET_SIZE(outer.ptr());
  std::vector<py::object> inner;  // references: `outer` may be a temporary list
  inner.reserve(n);
  py::array_t<i64> cu(n + 1);
  i64* c = cu.mutable_data();
  c[0] = 0;
  for (py::ssize_t i = 0; i < n; ++i) {
    inner.push_back(fast(PySequence_Fast_GET_ITEM(outer.ptr(), i), "pack: expected a sequence of sequences of ints"));
    c[i + 1] = c[i] + PySequence_Fast_GET_SIZE(inner.back().ptr());
  }
  py::array_t<i64> flat(c[n]);
  i64* out = flat.mutable_data();
  for (py::ssize_t i = 0; i < n; ++i) {
    PyObject* s = inner[i].ptr();
    const py::ssize_t len = c[i + 1] - c[i];
    for (py::ssize_t k = 0; k < len; ++k) {
      PyObject* x = PySequence_Fast_GET_ITEM(s, k);
      long long v;
      if (PyLong_CheckExact(x)) {
        v = PyLong_AsLongLong(x);
      } else {  // runs __index__, which could change `s`: hold the item, then re-check the size
        auto hold = py::reinterpret_borrow<py::object>(x);
        v = PyLong_AsLongLong(x);
        if (PySequence_Fast_GET_SIZE(s) != len) throw py::value_error("pack: a sequence changed size while packing");
      }
      if (v == -1 && PyErr_Occurred()) throw py::error_already_set();  // OverflowError / TypeError
      *out++ = static_cast<i64>(v);
    }
  }
  return py::make_tuple(flat, cu);
}

}  // namespace

PYBIND11_MODULE(_align_ext, mod) {
  mod.doc() = "Alignment maps for Token Distillation on packed int64 buffers (see tokdistill_fast/align.py).";
  mod.def("align", &align, py::arg("teacher_ids"), py::arg("cu_teacher"), py::arg("phrase_ids"),
          py::arg("cu_phrase"), py::arg("snippet_phrase"), py::arg("phrase_new_id"),
          "align(teacher_ids, cu_teacher, phrase_ids, cu_phrase, snippet_phrase, phrase_new_id) -> (student_ids "
          "int64, cu_student int64, s_pos int32, t_pos int32, cu_aligned int64); same result as align_py. "
          "Raises ValueError on malformed input; releases the GIL while it works.");
  mod.def("cross_align", &cross_align, py::arg("teacher_ids"), py::arg("cu_teacher"), py::arg("teacher_ends"),
          py::arg("student_ids"), py::arg("cu_student"), py::arg("student_ends"),
          "cross_align(teacher_ids, cu_teacher, teacher_ends, student_ids, cu_student, student_ends) -> (s_pos "
          "int32, t_pos int32, cu_aligned int64); same pairs as align.cross_align_py. Raises ValueError on "
          "malformed input; releases the GIL while it works.");
  mod.def("pack", &pack, py::arg("seqs"),
          "pack(seqs) -> (values int64, cu_seqlens int64) for a sequence of sequences of ints; same as "
          "tokdistill_fast.align.pack.");
}
