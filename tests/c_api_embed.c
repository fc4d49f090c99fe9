/* Runs an exported model through ONNX Runtime's C API, as a non-Python user (C, C++, Rust `ort`) would.
 *
 * Usage: c_api_embed MODEL.onnx OP_LIBRARY.so INPUT.bin OUTPUT.bin
 *   INPUT.bin:  int64 B, int64 S, then input_ids (B*S int64), then attention_mask (B*S int64)
 *   OUTPUT.bin: last_hidden_state, B*S*H float32, row-major
 * Prints "B S H" on success. Every OrtStatus is checked; a failure prints ORT's message and exits 1.
 * The op library is registered with RegisterCustomOpsLibrary_V2 (ORT keeps it loaded and unloads it).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "onnxruntime_c_api.h"

static const OrtApi *api;

static void check(OrtStatus *status, const char *what) {
  if (status != NULL) {
    fprintf(stderr, "c_api_embed: %s failed: %s\n", what, api->GetErrorMessage(status));
    api->ReleaseStatus(status);
    exit(1);
  }
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s MODEL.onnx OP_LIBRARY.so INPUT.bin OUTPUT.bin\n", argv[0]);
    return 2;
  }
  api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (api == NULL) {
    fprintf(stderr, "c_api_embed: this onnxruntime does not provide C API version %d\n", ORT_API_VERSION);
    return 1;
  }

  int64_t shape[2];
  FILE *in = fopen(argv[3], "rb");
  if (in == NULL || fread(shape, sizeof(int64_t), 2, in) != 2) {
    fprintf(stderr, "c_api_embed: cannot read %s\n", argv[3]);
    return 1;
  }
  size_t count = (size_t)(shape[0] * shape[1]);
  int64_t *ids = malloc(count * sizeof(int64_t)), *mask = malloc(count * sizeof(int64_t));
  if (fread(ids, sizeof(int64_t), count, in) != count || fread(mask, sizeof(int64_t), count, in) != count) {
    fprintf(stderr, "c_api_embed: %s is shorter than its header says\n", argv[3]);
    return 1;
  }
  fclose(in);

  OrtEnv *env;
  check(api->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "c_api_embed", &env), "CreateEnv");
  OrtSessionOptions *options;
  check(api->CreateSessionOptions(&options), "CreateSessionOptions");
  check(api->SetSessionGraphOptimizationLevel(options, ORT_ENABLE_ALL), "SetSessionGraphOptimizationLevel");
  check(api->SetIntraOpNumThreads(options, 1), "SetIntraOpNumThreads");
  check(api->RegisterCustomOpsLibrary_V2(options, argv[2]), "RegisterCustomOpsLibrary_V2");
  OrtSession *session;
  check(api->CreateSession(env, argv[1], options, &session), "CreateSession");

  OrtMemoryInfo *cpu;
  check(api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu), "CreateCpuMemoryInfo");
  OrtValue *inputs[2] = {NULL, NULL};
  check(api->CreateTensorWithDataAsOrtValue(cpu, ids, count * sizeof(int64_t), shape, 2,
                                            ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &inputs[0]), "CreateTensor(input_ids)");
  check(api->CreateTensorWithDataAsOrtValue(cpu, mask, count * sizeof(int64_t), shape, 2,
                                            ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, &inputs[1]), "CreateTensor(attention_mask)");
  const char *input_names[2] = {"input_ids", "attention_mask"};
  const char *output_names[1] = {"last_hidden_state"};
  OrtValue *output = NULL;
  check(api->Run(session, NULL, input_names, (const OrtValue *const *)inputs, 2, output_names, 1, &output), "Run");

  OrtTensorTypeAndShapeInfo *info;
  check(api->GetTensorTypeAndShape(output, &info), "GetTensorTypeAndShape");
  int64_t dims[3];
  size_t rank;
  check(api->GetDimensionsCount(info, &rank), "GetDimensionsCount");
  if (rank != 3) {
    fprintf(stderr, "c_api_embed: last_hidden_state has rank %zu, expected 3\n", rank);
    return 1;
  }
  check(api->GetDimensions(info, dims, 3), "GetDimensions");
  api->ReleaseTensorTypeAndShapeInfo(info);
  float *hidden;
  check(api->GetTensorMutableData(output, (void **)&hidden), "GetTensorMutableData");

  size_t n = (size_t)(dims[0] * dims[1] * dims[2]);
  FILE *out = fopen(argv[4], "wb");
  if (out == NULL || fwrite(hidden, sizeof(float), n, out) != n || fclose(out) != 0) {
    fprintf(stderr, "c_api_embed: cannot write %s\n", argv[4]);
    return 1;
  }
  printf("%lld %lld %lld\n", (long long)dims[0], (long long)dims[1], (long long)dims[2]);

  api->ReleaseValue(output);
  api->ReleaseValue(inputs[0]);
  api->ReleaseValue(inputs[1]);
  api->ReleaseMemoryInfo(cpu);
  api->ReleaseSession(session);
  api->ReleaseSessionOptions(options);
  api->ReleaseEnv(env);
  free(ids);
  free(mask);
  return 0;
}
