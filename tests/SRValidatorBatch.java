// Runs pixelmed's DicomSRValidator over many Structured Reports in one JVM, for
// tests/test_conformance.py.
//
// pixelmed's own main (com.pixelmed.validate.DicomSRValidator FILE) takes one file
// and spends about 5 s compiling its 6 MB template stylesheet before it starts; one
// validator kept for every file costs about 1 s a report instead. Run from source
// (java tests/SRValidatorBatch.java, Java 11+; Debian's JRE carries the compiler
// module) with /usr/share/java/pixelmed.jar (libpixelmed-java) on the class path.
//
// Reads one file path a line from stdin until EOF and prints, for each:
//   ### <path>
//   <what DicomSRValidator.validate(path) returns, the same text its main prints>
//   ### end
// A report the validator cannot read gets an "Error: ..." line of its own, so that
// the caller counts it as an error instead of taking silence for success (pixelmed's
// main prints a stack trace and exits 0).

import com.pixelmed.validate.DicomSRValidator;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;

public class SRValidatorBatch {
    public static void main(String[] args) throws Exception {
        // JDK 17 caps XPath expressions at 10,000 operators when secure processing is
        // on (JAXP0801003); pixelmed's compiled template rules exceed that, and the
        // validator then fails before it reads a file. 0 means no limit.
        System.setProperty("jdk.xml.xpathExprGrpLimit", "0");
        System.setProperty("jdk.xml.xpathExprOpLimit", "0");
        System.setProperty("jdk.xml.xpathTotalOpLimit", "0");
        DicomSRValidator validator = new DicomSRValidator();
        BufferedReader in =
                new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String path;
        while ((path = in.readLine()) != null) {
            if (path.isEmpty()) {
                continue;
            }
            System.out.println("### " + path);
            try {
                System.out.print(validator.validate(path));
            } catch (Exception e) {
                System.out.println("Error: validator failed: " + e);
            }
            System.out.println("### end");
            System.out.flush();
        }
    }
}
