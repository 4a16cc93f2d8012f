#include "test_certs.hpp"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stdlib.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace evmux::support {

namespace {

[[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("tls_certs: " + what);
}

struct KeyFree {
    void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct CertFree {
    void operator()(X509* c) const { X509_free(c); }
};
using Key = std::unique_ptr<EVP_PKEY, KeyFree>;
using Cert = std::unique_ptr<X509, CertFree>;

Key new_key() {
    Key k(EVP_EC_gen("P-256"));
    if (!k) fail("EVP_EC_gen");
    return k;
}

void add_ext(X509* cert, X509* issuer, int nid, const char* value) {
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
    if (!ext || X509_add_ext(cert, ext, -1) != 1) fail(std::string("extension ") + value);
    X509_EXTENSION_free(ext);
}

// A certificate for `key` named `cn`, signed by issuer/issuer_key (itself when
// null), valid from `from` to `to` seconds relative to now.
Cert make_cert(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key, long from,
               long to, const std::vector<std::pair<int, const char*>>& exts) {
    static long serial = 1;
    Cert cert(X509_new());
    if (!cert) fail("X509_new");
    X509_set_version(cert.get(), 2);
    ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), serial++);
    X509_gmtime_adj(X509_getm_notBefore(cert.get()), from);
    X509_gmtime_adj(X509_getm_notAfter(cert.get()), to);
    X509_set_pubkey(cert.get(), key);
    X509_NAME* name = X509_get_subject_name(cert.get());
    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>("evmux tests"), -1, -1, 0);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
    X509* signer = issuer ? issuer : cert.get();
    X509_set_issuer_name(cert.get(), X509_get_subject_name(signer));
    for (const auto& [nid, value] : exts) add_ext(cert.get(), signer, nid, value);
    if (X509_sign(cert.get(), issuer_key ? issuer_key : key, EVP_sha256()) == 0)
        fail("X509_sign " + cn);
    return cert;
}

void write_pem(const std::string& path, X509* cert, EVP_PKEY* key) {
    FILE* f = std::fopen(path.c_str(), "w");
    if (!f) fail("fopen " + path);
    bool ok = cert ? PEM_write_X509(f, cert) == 1
                   : PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr, nullptr) == 1;
    std::fclose(f);
    if (!ok) fail("PEM write " + path);
}

std::string remove_at_exit;
void remove_dir() {
    std::error_code ec;
    std::filesystem::remove_all(remove_at_exit, ec);
}

TlsFiles make_files() {
    TlsFiles f;
    std::string tmpl = (std::filesystem::temp_directory_path() / "evmux-tls-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) fail("mkdtemp");
    f.dir = tmpl;
    remove_at_exit = f.dir;
    std::atexit(remove_dir);
    const long hour = 3600, year = 365 * 24 * hour;
    const std::vector<std::pair<int, const char*>> ca_exts = {
        {NID_basic_constraints, "critical,CA:TRUE"},
        {NID_key_usage, "critical,keyCertSign,cRLSign"},
        {NID_subject_key_identifier, "hash"}};
    auto leaf = [](const char* san, const char* usage) {
        return std::vector<std::pair<int, const char*>>{
            {NID_basic_constraints, "critical,CA:FALSE"},
            {NID_key_usage, "critical,digitalSignature"},
            {NID_ext_key_usage, usage},
            {NID_subject_alt_name, san},
            {NID_authority_key_identifier, "keyid"}};
    };
    Key ca_key = new_key();
    Cert ca = make_cert(ca_key.get(), "evmux test CA", nullptr, nullptr, -hour, year, ca_exts);
    Key other_ca_key = new_key();
    Cert other_ca =
        make_cert(other_ca_key.get(), "evmux other CA", nullptr, nullptr, -hour, year, ca_exts);
    auto issue = [&](const std::string& base, const char* cn, long from, long to, const char* san,
                     const char* usage, std::string& cert_path, std::string& key_path) {
        Key key = new_key();
        Cert cert = make_cert(key.get(), cn, ca.get(), ca_key.get(), from, to, leaf(san, usage));
        cert_path = f.dir + "/" + base + ".crt";
        key_path = f.dir + "/" + base + ".key";
        write_pem(cert_path, cert.get(), nullptr);
        write_pem(key_path, nullptr, key.get());
    };
    const char* local_san = "DNS:localhost,IP:127.0.0.1,IP:::1";
    issue("server", "localhost", -hour, year, local_san, "serverAuth", f.server_cert, f.server_key);
    issue("expired", "localhost", -2 * year, -hour, local_san, "serverAuth", f.expired_cert,
          f.expired_key);
    issue("name-only", "localhost", -hour, year, "DNS:localhost", "serverAuth", f.name_only_cert,
          f.name_only_key);
    issue("other", "other.example", -hour, year, "DNS:other.example", "serverAuth", f.other_cert,
          f.other_key);
    issue("client", "evmux test client", -hour, year, "DNS:client.test", "clientAuth",
          f.client_cert, f.client_key);
    f.ca = f.dir + "/ca.crt";
    write_pem(f.ca, ca.get(), nullptr);
    f.other_ca = f.dir + "/other-ca.crt";
    write_pem(f.other_ca, other_ca.get(), nullptr);
    f.garbage = f.dir + "/garbage.pem";
    FILE* g = std::fopen(f.garbage.c_str(), "w");
    if (!g) fail("fopen " + f.garbage);
    std::fputs("this is not a PEM file\n", g);
    std::fclose(g);
    return f;
}

}  // namespace

const TlsFiles& tls_files() {
    static const TlsFiles files = make_files();
    return files;
}

}  // namespace evmux::support
